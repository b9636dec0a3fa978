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

{{/* The Secret holding the pool servers' access.json (auth.keys, hashes only). */}}
{{- define "loramux.accessSecretName" -}}
{{- printf "%s-access" (include "loramux.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Where the pool servers find access.json (the access Secret, mounted read-only). */}}
{{- define "loramux.accessDir" -}}
/etc/loramux/access
{{- end }}

{{/*
How the tokens Secret comes to be, one of:
  existing - tokens.existingSecret: the user's Secret, nothing rendered;
  values   - tokens.adminToken and tokens.sidecarToken: rendered from the values;
  operator - neither: the operator creates "<fullname>-tokens" with random tokens at run time
             (--tokens-secret) when it is absent, so the chart renders no token at all and two
             renders of the same values (helm template, GitOps) are identical.
*/}}
{{- define "loramux.tokensMode" -}}
{{- $t := .Values.tokens }}
{{- if $t.existingSecret }}existing
{{- else if and $t.adminToken $t.sidecarToken }}values
{{- else if or $t.adminToken $t.sidecarToken }}
{{- fail "tokens: give both tokens.adminToken and tokens.sidecarToken, or tokens.existingSecret, or neither (the operator then creates the Secret)" }}
{{- else if .Values.operator.enabled }}operator
{{- else }}
{{- fail "tokens: without the operator (operator.enabled=false) set tokens.existingSecret or tokens.adminToken and tokens.sidecarToken" }}
{{- end }}
{{- end }}

{{/* The labels a pod must carry to get the sidecar token, S3 keys and routes from the
operator (operator.poolOwner.labels, else the inference pods' selector labels). */}}
{{- define "loramux.poolOwnerLabels" -}}
{{- if .Values.operator.poolOwner.labels }}
{{- .Values.operator.poolOwner.labels }}
{{- else }}
{{- printf "app.kubernetes.io/name=loramux-inference,app.kubernetes.io/instance=%s" .Release.Name }}
{{- end }}
{{- end }}

{{/* namespace/name of the Deployment whose ReplicaSets' pods the operator trusts (empty: the
labels alone). */}}
{{- define "loramux.poolOwnerDeployment" -}}
{{- if .Values.operator.poolOwner.deployment }}
{{- .Values.operator.poolOwner.deployment }}
{{- else if and .Values.inference.enabled (not .Values.operator.poolOwner.labels) }}
{{- printf "%s/%s" .Release.Namespace (include "loramux.inference.fullname" .) }}
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

{{/*
----------------------------------------------------------------------------------------------
The server container and its model, shared by the inference pool (inference-deployment.yaml)
and the hot tenants' dedicated pod template (dedicated-template.yaml), so the two cannot
drift. Each helper takes (dict "root" $ "dedicated" <bool>): dedicated=true leaves out what a
dedicated (merged, sidecar-less) pod has no use for: the token volume and the admin token
file, LORAMUX_QUANTIZATION (merge mode loads an unquantized base itself), the adapter volume
(the operator adds its own) and the S3 credentials Secret.
----------------------------------------------------------------------------------------------
*/}}

{{/* A Kubernetes quantity ("20Gi", "500M", "1073741824") in bytes, as an integer. */}}
{{- define "loramux.quantityBytes" -}}
{{- $q := toString . }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q }}
{{- $suffix := trimPrefix $number $q }}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 }}
{{- if not (hasKey $units $suffix) }}
{{- fail (printf "cannot read the quantity %q" $q) }}
{{- end }}
{{- mulf (float64 $number) (float64 (get $units $suffix)) | floor | int64 }}
{{- end }}

{{/* The sidecar's disk budget: inference.sync.diskBudgetBytes, or 90% of the emptyDir's
sizeLimit when 0, so a full volume fails a download (reason disk_budget) instead of getting
the pod evicted; a budget at or above the sizeLimit fails the render. 0: no budget (pvc). */}}
{{- define "loramux.sync.diskBudgetBytes" -}}
{{- $inf := .Values.inference }}
{{- $budget := int64 $inf.sync.diskBudgetBytes }}
{{- if eq $inf.adapterVolume.type "emptyDir" }}
{{- $limit := include "loramux.quantityBytes" $inf.adapterVolume.sizeLimit | int64 }}
{{- if eq $budget 0 }}
{{- $budget = divf (mulf $limit 9) 10 | floor | int64 }}
{{- else if ge $budget $limit }}
{{- fail (printf "inference.sync.diskBudgetBytes (%d) must be below inference.adapterVolume.sizeLimit (%s = %d bytes): the kubelet evicts a pod whose emptyDir is full" $budget $inf.adapterVolume.sizeLimit $limit) }}
{{- end }}
{{- end }}
{{- $budget }}
{{- end }}

{{/* Fails the render when the model source or the adapter volume lacks its details. */}}
{{- define "loramux.inference.checkValues" -}}
{{- $inf := .Values.inference }}
{{- $model := $inf.model }}
{{- if and (eq $model.source "pvc") (not $model.pvc.claimName) }}
{{- fail "inference.model.source=pvc needs inference.model.pvc.claimName" }}
{{- end }}
{{- if and (eq $model.source "image") (not $model.image.path) }}
{{- fail "inference.model.source=image needs inference.model.image.path" }}
{{- end }}
{{- if and (eq $model.source "huggingface") (or (not $model.huggingface.id) (not $model.huggingface.cacheClaimName)) }}
{{- fail "inference.model.source=huggingface needs inference.model.huggingface.id and .cacheClaimName (a pre-pulled cache)" }}
{{- end }}
{{- if and (eq $inf.adapterVolume.type "pvc") (not $inf.adapterVolume.claimName) }}
{{- fail "inference.adapterVolume.type=pvc needs inference.adapterVolume.claimName" }}
{{- end }}
{{- if eq (int $inf.metricsPort) (int $inf.adminPort) }}
{{- fail "inference.metricsPort must differ from inference.adminPort" }}
{{- end }}
{{- end }}

{{/* Resources of the server container: inference.resources (or dedicated.resources when
set, for a dedicated pod), plus the GPU limit when inference.gpu.enabled. */}}
{{- define "loramux.server.resources" -}}
{{- $root := .root }}
{{- $inf := $root.Values.inference }}
{{- $res := deepCopy ($inf.resources | default dict) }}
{{- if and .dedicated $root.Values.dedicated.resources }}
{{- $res = deepCopy $root.Values.dedicated.resources }}
{{- end }}
{{- if $inf.gpu.enabled }}
{{- $limits := deepCopy (get $res "limits" | default dict) }}
{{- $_ := set $limits $inf.gpu.resourceName $inf.gpu.count }}
{{- $_ = set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{- define "loramux.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "loramux.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* The init containers the model source needs (a list, possibly empty). */}}
{{- define "loramux.server.initContainers" -}}
{{- $root := .root }}
{{- $inf := $root.Values.inference }}
{{- $model := $inf.model }}
{{- if eq $model.source "huggingface" }}
# Resolves the model id to its snapshot directory in the pre-pulled cache and links
# it at /var/run/loramux/model/current. Offline unless allowDownload is true.
- name: resolve-model
  image: {{ include "loramux.image" (dict "image" $inf.image "root" $root) }}
  imagePullPolicy: {{ $inf.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import os
      from huggingface_hub import snapshot_download
      path = snapshot_download(
          os.environ["HF_MODEL_ID"], revision=os.environ["HF_MODEL_REVISION"],
          local_files_only=os.environ["HF_ALLOW_DOWNLOAD"] != "true")
      link = "/var/run/loramux/model/current"
      if os.path.lexists(link):
          os.unlink(link)
      os.symlink(path, link)
      print("model", os.environ["HF_MODEL_ID"], "at", path)
  env:
    - name: HF_MODEL_ID
      value: {{ $model.huggingface.id | quote }}
    - name: HF_MODEL_REVISION
      value: {{ $model.huggingface.revision | quote }}
    - name: HF_ALLOW_DOWNLOAD
      value: {{ $model.huggingface.allowDownload | quote }}
    - name: HF_HOME
      value: /hf-cache
    {{- if not $model.huggingface.allowDownload }}
    - name: HF_HUB_OFFLINE
      value: "1"
    {{- end }}
    - name: HOME
      value: /tmp
  volumeMounts:
    - name: hf-cache
      mountPath: /hf-cache
      readOnly: {{ not $model.huggingface.allowDownload }}
    - name: model-link
      mountPath: /var/run/loramux/model
    - name: tmp
      mountPath: /tmp
  securityContext:
    {{- include "loramux.containerSecurityContext" $root | nindent 4 }}
{{- end }}
{{- end }}

{{/* Environment of the server container (a list). */}}
{{- define "loramux.server.env" -}}
{{- $root := .root }}
{{- $inf := $root.Values.inference }}
{{- $model := $inf.model }}
{{- $servedName := $model.servedName }}
{{- if and (not $servedName) (eq $model.source "huggingface") }}
{{- $servedName = $model.huggingface.id }}
{{- end }}
- name: LORAMUX_HOST
  value: 0.0.0.0
- name: LORAMUX_PORT
  value: "8000"
# The admin API (/admin) listens on 127.0.0.1 only, for the sidecar in the same pod; the
# public port answers 404 there. Never a containerPort, never in a Service.
- name: LORAMUX_ADMIN_PORT
  value: {{ $inf.adminPort | quote }}
{{- if not .dedicated }}
- name: LORAMUX_ADMIN_TOKEN_FILE
  value: /var/run/loramux/tokens/admin-token
{{- end }}
# Who may call what (auth.mode): keys = a key whose hash grants the model; never none by
# default. The chart's grants (auth.keys) are in the access file; each tenant's own keys
# arrive through the operator (spec.access).
- name: LORAMUX_AUTH
  value: {{ $root.Values.auth.mode | quote }}
{{- if not .dedicated }}
- name: LORAMUX_ACCESS_FILE
  value: {{ printf "%s/access.json" (include "loramux.accessDir" $root) | quote }}
# Per-tenant metrics on their own port (container port "metrics"; the NetworkPolicy admits
# the operator and networkPolicy.metricsFrom); the public port's /metrics shows sums only.
- name: LORAMUX_METRICS_PORT
  value: {{ $inf.metricsPort | quote }}
- name: LORAMUX_METRICS_HOST
  value: 0.0.0.0
{{- end }}
# Per-tenant latency histograms: for at most this many tenants (the rest in tenant="_other").
- name: LORAMUX_METRICS_TENANT_HISTOGRAMS
  value: {{ $inf.metricsTenantHistograms | int64 | quote }}
# Fair shares: admission order and each tenant's default limits (inference.tenantLimits).
- name: LORAMUX_ADMISSION
  value: {{ $inf.admission | quote }}
{{- $tl := $inf.tenantLimits }}
{{- if not (kindIs "invalid" $tl.maxConcurrent) }}
- name: LORAMUX_TENANT_MAX_CONCURRENT
  value: {{ $tl.maxConcurrent | int64 | quote }}
{{- end }}
{{- if not (kindIs "invalid" $tl.maxQueued) }}
- name: LORAMUX_TENANT_MAX_QUEUED
  value: {{ $tl.maxQueued | int64 | quote }}
{{- end }}
{{- if not (kindIs "invalid" $tl.tokensPerMinute) }}
- name: LORAMUX_TENANT_TOKENS_PER_MINUTE
  value: {{ $tl.tokensPerMinute | int64 | quote }}
{{- end }}
# The admin API loads adapters only from inside the shared adapter volume.
- name: LORAMUX_ADAPTER_ROOT
  value: /adapters
{{- if eq $model.source "pvc" }}
- name: LORAMUX_MODEL
  value: {{ printf "/models/%s" ($model.pvc.path | trimPrefix "/") | trimSuffix "/" | quote }}
{{- else if eq $model.source "image" }}
- name: LORAMUX_MODEL
  value: {{ $model.image.path | quote }}
{{- else if eq $model.source "huggingface" }}
- name: LORAMUX_MODEL
  value: /var/run/loramux/model/current
{{- end }}
{{- with $servedName }}
- name: LORAMUX_SERVED_MODEL_NAME
  value: {{ . | quote }}
{{- end }}
# Where the embedded demo model is converted on first start.
- name: LORAMUX_CACHE_DIR
  value: /var/cache/loramux
{{- if not .dedicated }}
- name: LORAMUX_QUANTIZATION
  value: {{ $inf.quantization | quote }}
{{- end }}
- name: LORAMUX_COMPUTE_DTYPE
  value: {{ $inf.computeDtype | quote }}
- name: LORAMUX_DEVICE
  value: {{ include "loramux.inference.device" $root | quote }}
- name: LORAMUX_LORA_BACKEND
  value: {{ $inf.loraBackend | quote }}
- name: LORAMUX_UNKNOWN_TENANT
  value: {{ $inf.unknownTenant | quote }}
- name: LORAMUX_ALLOW_PICKLE_ADAPTERS
  value: {{ $inf.allowPickleAdapters | quote }}
{{- if gt (int $inf.torchThreads) 0 }}
- name: LORAMUX_TORCH_THREADS
  value: {{ $inf.torchThreads | quote }}
{{- end }}
- name: LORAMUX_LOG_LEVEL
  value: {{ $inf.logLevel | quote }}
- name: LORAMUX_MAX_BATCH_SIZE
  value: {{ $inf.limits.maxBatchSize | quote }}
- name: LORAMUX_MAX_QUEUE
  value: {{ $inf.limits.maxQueue | quote }}
- name: LORAMUX_MAX_PROMPT_TOKENS
  value: {{ $inf.limits.maxPromptTokens | quote }}
- name: LORAMUX_MAX_NEW_TOKENS_LIMIT
  value: {{ $inf.limits.maxNewTokens | quote }}
- name: LORAMUX_DEFAULT_MAX_NEW_TOKENS
  value: {{ $inf.limits.defaultMaxNewTokens | quote }}
- name: LORAMUX_MAX_PREFILL_TOKENS
  value: {{ $inf.limits.maxPrefillTokens | quote }}
- name: LORAMUX_REQUEST_TIMEOUT_S
  value: {{ $inf.limits.requestTimeoutSeconds | quote }}
{{- if not (kindIs "invalid" $inf.limits.maxQueueWaitSeconds) }}
- name: LORAMUX_MAX_QUEUE_WAIT_S
  value: {{ $inf.limits.maxQueueWaitSeconds | quote }}
{{- end }}
- name: LORAMUX_PEER_FAILOVER_S
  value: {{ $inf.peers.failoverSeconds | quote }}
- name: LORAMUX_PEER_CONNECT_TIMEOUT_S
  value: {{ $inf.peers.connectTimeoutSeconds | quote }}
- name: LORAMUX_PEER_HANG_TIMEOUT_S
  value: {{ $inf.peers.hangTimeoutSeconds | quote }}
- name: LORAMUX_MAX_BODY_BYTES
  value: {{ $inf.limits.maxBodyBytes | int64 | quote }}
- name: LORAMUX_DRAIN_TIMEOUT_S
  value: {{ $inf.termination.drainTimeoutSeconds | quote }}
- name: LORAMUX_MAX_LORA_RANK
  value: {{ $inf.cache.maxLoraRank | quote }}
- name: LORAMUX_DEVICE_ADAPTER_SLOTS
  value: {{ $inf.cache.deviceAdapterSlots | quote }}
- name: LORAMUX_DEVICE_CACHE_BYTES
  value: {{ $inf.cache.deviceCacheBytes | int64 | quote }}
- name: LORAMUX_HOST_CACHE_BYTES
  value: {{ $inf.cache.hostCacheBytes | int64 | quote }}
# Never reach a model hub from the server.
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- if eq $model.source "huggingface" }}
- name: HF_HOME
  value: /hf-cache
{{- end }}
- name: HOME
  value: /tmp
{{- if .dedicated }}
{{- /* The operator's fetch init container takes the AWS_* settings of this container
(never credentials: those come from the LoraAdapter's credentialsSecret or the pods'
ServiceAccount identity). */}}
{{- with $inf.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- with $inf.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- /* The pool's extra env, minus what a dedicated pod must not take over, then its own. */}}
{{- range $inf.extraEnv }}
{{- if not (has .name (list "LORAMUX_QUANTIZATION" "LORAMUX_ADMIN_TOKEN" "LORAMUX_ADMIN_TOKEN_FILE")) }}
- {{ toYaml . | indent 2 | trim }}
{{- end }}
{{- end }}
{{- with $root.Values.dedicated.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- else }}
{{- with $inf.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Mounts of the model (and the model's scratch space) in the server container (a list). */}}
{{- define "loramux.server.modelVolumeMounts" -}}
{{- $model := .root.Values.inference.model }}
- name: model-cache
  mountPath: /var/cache/loramux
- name: tmp
  mountPath: /tmp
{{- if eq $model.source "pvc" }}
- name: model
  mountPath: /models
  readOnly: true
{{- else if eq $model.source "huggingface" }}
- name: hf-cache
  mountPath: /hf-cache
  readOnly: true
- name: model-link
  mountPath: /var/run/loramux/model
  readOnly: true
{{- end }}
{{- end }}

{{/* The volumes behind loramux.server.modelVolumeMounts (a list). */}}
{{- define "loramux.server.modelVolumes" -}}
{{- $model := .root.Values.inference.model }}
- name: model-cache
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- if eq $model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $model.pvc.claimName }}
    readOnly: true
{{- else if eq $model.source "huggingface" }}
- name: hf-cache
  persistentVolumeClaim:
    claimName: {{ $model.huggingface.cacheClaimName }}
    readOnly: {{ not $model.huggingface.allowDownload }}
- name: model-link
  emptyDir:
    sizeLimit: 1Mi
{{- end }}
{{- end }}

{{/* What the server container is, apart from its command, ports and probes (a mapping;
the pool adds those, the operator sets its own for a dedicated pod). */}}
{{- define "loramux.server.container" -}}
{{- $root := .root }}
{{- $inf := $root.Values.inference }}
name: server
image: {{ include "loramux.image" (dict "image" $inf.image "root" $root) }}
imagePullPolicy: {{ $inf.image.pullPolicy }}
env:
  {{- include "loramux.server.env" . | trim | nindent 2 }}
lifecycle:
  # Lets the endpoints controller stop routing here before SIGTERM; uvicorn then
  # stops accepting and drains in-flight requests (LORAMUX_DRAIN_TIMEOUT_S).
  preStop:
    exec:
      command: [sleep, {{ $inf.termination.preStopSleepSeconds | quote }}]
resources:
  {{- include "loramux.server.resources" . | nindent 2 }}
securityContext:
  {{- include "loramux.containerSecurityContext" $root | nindent 2 }}
volumeMounts:
  {{- if not .dedicated }}
  - name: adapters
    mountPath: /adapters
  - name: tokens
    mountPath: /var/run/loramux/tokens
    readOnly: true
  - name: access
    mountPath: {{ include "loramux.accessDir" $root }}
    readOnly: true
  {{- end }}
  {{- include "loramux.server.modelVolumeMounts" . | trim | nindent 2 }}
{{- end }}

{{/* preStop sleep + the server's drain window + a margin for the engine to stop. */}}
{{- define "loramux.server.terminationGracePeriodSeconds" -}}
{{- $t := .Values.inference.termination }}
{{- add $t.preStopSleepSeconds $t.drainTimeoutSeconds 10 }}
{{- end }}

{{/* The pod template of a hot tenant's dedicated Deployment (the operator's
operator/dedicated.py build_deployment fills in the server's command, ports and probes, the
adapter volume and the fetch init container). */}}
{{- define "loramux.dedicated.podTemplate" -}}
{{- $inf := .Values.inference }}
{{- $ded := .Values.dedicated }}
{{- $ctx := dict "root" . "dedicated" true }}
metadata:
  labels:
    app.kubernetes.io/instance: {{ .Release.Name }}
    app.kubernetes.io/part-of: loramux
    app.kubernetes.io/component: dedicated
    {{- with $ded.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $fetchSecret := and $ded.usePoolS3Secret $inf.s3.existingSecret }}
  annotations:
    {{- with $ded.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- if $fetchSecret }}
    # Read by the operator: this Secret is mounted into the "fetch" init container only.
    loramux.io/fetch-s3-secret: {{ $inf.s3.existingSecret | quote }}
    {{- end }}
    # Read by the operator: the pool's access Secret (auth.keys, hashes only), whose grants
    # it copies into each dedicated deployment's own access file.
    loramux.io/pool-access-secret: {{ include "loramux.accessSecretName" . | quote }}
spec:
  serviceAccountName: {{ include "loramux.inference.serviceAccountName" . }}
  # The dedicated pods never talk to the Kubernetes API.
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $inf.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ include "loramux.server.terminationGracePeriodSeconds" . }}
  securityContext:
    {{- include "loramux.podSecurityContext" . | nindent 4 }}
  {{- with (include "loramux.server.initContainers" $ctx | trim) }}
  initContainers:
    {{- . | nindent 4 }}
  {{- end }}
  containers:
    - {{ include "loramux.server.container" $ctx | trim | indent 6 | trim }}
  volumes:
    {{- include "loramux.server.modelVolumes" $ctx | trim | nindent 4 }}
  {{- with (ternary $ded.nodeSelector $inf.nodeSelector (not (empty $ded.nodeSelector))) }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (ternary $ded.tolerations $inf.tolerations (not (empty $ded.tolerations))) }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (ternary $ded.affinity $inf.affinity (not (empty $ded.affinity))) }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{- define "loramux.dedicated.templateName" -}}
{{- printf "%s-dedicated-template" (include "loramux.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Where the operator container finds the dedicated pod template. */}}
{{- define "loramux.dedicated.templateDir" -}}
/etc/loramux/dedicated
{{- end }}
