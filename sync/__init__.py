"""The adapter-sync sidecar (``loramux sync``): makes one inference server's adapters match the desired set its operator sends."""
