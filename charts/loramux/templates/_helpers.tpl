{{/* Names and labels shared by every template. */}}

{{- define "loramux.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loramux.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "loramux.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "loramux.labels" -}}
helm.sh/chart: {{ include "loramux.chart" . }}
app.kubernetes.io/part-of: loramux
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of the inference pods. The operator finds pods by these two labels. */}}
{{- define "loramux.inference.selectorLabels" -}}
app.kubernetes.io/name: loramux-inference
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "loramux.operator.selectorLabels" -}}
app.kubernetes.io/name: loramux-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "loramux.inference.fullname" -}}
{{- printf "%s-inference" (include "loramux.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loramux.operator.fullname" -}}
{{- printf "%s-operator" (include "loramux.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loramux.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "loramux.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loramux.inference.serviceAccountName" -}}
{{- if .Values.inference.serviceAccount.create }}
{{- default (include "loramux.inference.fullname" .) .Values.inference.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.inference.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loramux.peeringName" -}}
{{- default (include "loramux.fullname" .) .Values.operator.peeringName }}
{{- end }}

{{/* The Secret holding "admin-token" and "sidecar-token". */}}
{{- define "loramux.tokensSecretName" -}}
{{- default (printf "%s-tokens" (include "loramux.fullname" .)) .Values.tokens.existingSecret }}
{{- end }}

{{/*
A token: the value given, else the one already stored in the release's Secret (so upgrades
keep it), else a new random one. Called with (list $ "admin-token" .Values.tokens.adminToken).
*/}}
{{- define "loramux.token" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- $given := index . 2 }}
{{- if $given }}
{{- $given }}
{{- else }}
{{- $name := printf "%s-tokens" (include "loramux.fullname" $root) }}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace $name }}
{{- $stored := "" }}
{{- if and $existing $existing.data }}
{{- $stored = index $existing.data $key | default "" | b64dec }}
{{- end }}
{{- default (randAlphaNum 48) $stored }}
{{- end }}
{{- end }}

{{- define "loramux.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The server's device: auto follows gpu.enabled. */}}
{{- define "loramux.inference.device" -}}
{{- if ne .Values.inference.device "auto" }}
{{- .Values.inference.device }}
{{- else if .Values.inference.gpu.enabled }}
{{- "cuda" }}
{{- else }}
{{- "cpu" }}
{{- end }}
{{- end }}
