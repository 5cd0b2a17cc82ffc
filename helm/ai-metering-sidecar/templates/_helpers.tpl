{{/* Names and labels. */}}
{{- define "sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sidecar.fullname" -}}
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

{{- define "sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include "sidecar.selectorLabels" (list . "data") */}}
{{- define "sidecar.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "sidecar.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "sidecar.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "sidecar.port" -}}
{{ dig "server" "port" 8080 .Values.config | int }}
{{- end }}

{{- define "sidecar.opsPort" -}}
{{ dig "server" "ops_port" 9090 .Values.config | int }}
{{- end }}

{{/* holds.spool_dir: the data plane mounts its spool volume there. */}}
{{- define "sidecar.spoolDir" -}}
{{ dig "holds" "spool_dir" "/var/lib/sidecar/spool" .Values.config }}
{{- end }}

{{/* server.drain_timeout_ms in whole seconds, rounded up. */}}
{{- define "sidecar.drainSeconds" -}}
{{ div (add (dig "server" "drain_timeout_ms" 30000 .Values.config | int) 999) 1000 }}
{{- end }}

{{/* The ConfigMap's data: sidecar.yaml and pricing.yaml. */}}
{{- define "sidecar.configData" -}}
sidecar.yaml: |
  {{- toYaml .Values.config | nindent 2 }}
pricing.yaml: |
  {{- toYaml .Values.pricing | nindent 2 }}
{{- end }}

{{/* The same for the sidecar in the agent's pod: the data port on loopback, the ops port on every address. */}}
{{- define "sidecar.agentConfigData" -}}
{{- $config := mergeOverwrite (deepCopy .Values.config) (dict "server" (dict "host" "127.0.0.1" "ops_host" "0.0.0.0")) -}}
sidecar.yaml: |
  {{- toYaml $config | nindent 2 }}
pricing.yaml: |
  {{- toYaml .Values.pricing | nindent 2 }}
{{- end }}

{{/* Pod-level settings shared by every workload. */}}
{{- define "sidecar.podSpecCommon" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Container settings shared by every workload; (list . secretName). */}}
{{- define "sidecar.containerCommon" -}}
{{- $root := index . 0 -}}
image: {{ include "sidecar.image" $root }}
imagePullPolicy: {{ $root.Values.image.pullPolicy }}
securityContext:
  {{- toYaml $root.Values.securityContext | nindent 2 }}
env:
  - name: SIDECAR_CONFIG
    value: /etc/sidecar/sidecar.yaml
  - name: SIDECAR_LOG_LEVEL
    value: {{ $root.Values.logLevel | quote }}
  {{- with $root.Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
envFrom:
  - secretRef:
      name: {{ required "secretName: an existing Secret with SIDECAR_REDIS_URL, SIDECAR_DATABASE_URL, SIDECAR_ADMIN_TOKEN and provider keys" (index . 1) }}
  {{- with $root.Values.extraEnvFrom }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
volumeMounts:
  - name: config
    mountPath: /etc/sidecar
    readOnly: true
  - name: tmp
    mountPath: /tmp
{{- end }}

{{/* Volumes: the config (ConfigMap name as argument) and a writable /tmp. */}}
{{- define "sidecar.volumes" -}}
volumes:
  - name: config
    configMap:
      name: {{ . }}
  - name: tmp
    emptyDir: {}
{{- end }}

{{/* Pod annotations: config checksum (rolls pods on config change) and Prometheus scraping. */}}
{{- define "sidecar.podAnnotations" -}}
{{- $root := index . 0 -}}
checksum/config: {{ include "sidecar.configData" $root | sha256sum }}
{{- if $root.Values.metrics.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ include "sidecar.opsPort" $root | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with index . 1 }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Probes on the ops port: /readyz checks Redis and Postgres and fails while draining. */}}
{{- define "sidecar.probes" -}}
readinessProbe:
  httpGet:
    path: /readyz
    port: ops
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
# Liveness waits for the start (Lua scripts loaded, listeners open): up to 60 s, then 10 s periods.
startupProbe:
  httpGet:
    path: /healthz
    port: ops
  periodSeconds: 2
  timeoutSeconds: 3
  failureThreshold: 30
livenessProbe:
  httpGet:
    path: /healthz
    port: ops
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
{{- end }}

{{/* Refuse a grace period that cannot cover preStop sleep + drain; (list . componentValues). */}}
{{- define "sidecar.checkGrace" -}}
{{- $root := index . 0 }}
{{- $v := index . 1 }}
{{- $need := add (int $v.preStopSleepSeconds) (include "sidecar.drainSeconds" $root | int) }}
{{- if le (int $v.terminationGracePeriodSeconds) $need }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + server.drain_timeout_ms (%d s)" (int $v.terminationGracePeriodSeconds) $need) }}
{{- end }}
{{- end }}

{{/* The data plane's container (`sidecar serve`): in the data-plane Deployment and in the agent's pod. */}}
{{- define "sidecar.serveContainer" -}}
- name: sidecar
  args: ["serve", "--config", "/etc/sidecar/sidecar.yaml"]
  {{- include "sidecar.containerCommon" (list . .Values.secretName) | nindent 2 }}
    # Settlements Redis could not take in time wait here until it can (holds.spool_dir).
    - name: spool
      mountPath: {{ include "sidecar.spoolDir" . }}
  ports:
    - name: http
      containerPort: {{ include "sidecar.port" . }}
      protocol: TCP
    - name: ops
      containerPort: {{ include "sidecar.opsPort" . }}
      protocol: TCP
  {{- include "sidecar.probes" . | nindent 2 }}
  lifecycle:
    preStop:
      exec:
        command: ["sleep", "{{ .Values.data.preStopSleepSeconds }}"]
  resources:
    {{- toYaml .Values.data.resources | nindent 4 }}
{{- end }}

{{/* The spool volume the serve container mounts (data.spool). */}}
{{- define "sidecar.spoolVolume" -}}
- name: spool
  {{- if .Values.data.spool.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.data.spool.existingClaim }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.data.spool.sizeLimit }}
  {{- end }}
{{- end }}
