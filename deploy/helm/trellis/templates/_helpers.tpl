{{/*
Names, labels and the shared pieces of every pod. Components: coordinator, gateway, migrate,
worker.
*/}}

{{/* The chart name, overridable with nameOverride. */}}
{{- define "trellis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release-qualified name, at most 63 characters (a DNS label). The release name alone when it
already contains the chart name.
*/}}
{{- define "trellis.fullname" -}}
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

{{/* A component's resource name: include "trellis.componentName" (list $ "coordinator") */}}
{{- define "trellis.componentName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "trellis.fullname" $root | trunc 50 | trimSuffix "-") (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* chart-version, as the helm.sh/chart label. */}}
{{- define "trellis.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: include "trellis.selectorLabels" (list $ "coordinator"); "" = no component. */}}
{{- define "trellis.selectorLabels" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
app.kubernetes.io/name: {{ include "trellis.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
{{- if $component }}
app.kubernetes.io/component: {{ $component }}
{{- end }}
{{- end }}

{{/* Common labels: include "trellis.labels" (list $ "coordinator") */}}
{{- define "trellis.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "trellis.chart" $root }}
{{ include "trellis.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: trellis
{{- end }}

{{/* The Trellis image: repository@digest, or repository:tag (tag defaults to appVersion). */}}
{{- define "trellis.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* "true" when the coordinator keeps its state in SQLite inside its pod (no database set). */}}
{{- define "trellis.sqlite" -}}
{{- if and (not .Values.database.url) (not .Values.database.existingSecret) }}true{{ end }}
{{- end }}

{{/* Where the SQLite mode keeps its file (a volume mounted on the image's home directory). */}}
{{- define "trellis.sqliteDir" -}}/var/lib/trellis{{- end }}

{{/* The chart's own Secret (database URL, reserved Redis URL and signing keys). */}}
{{- define "trellis.secretName" -}}
{{- include "trellis.fullname" . }}
{{- end }}

{{/* "true" when the chart renders its own Secret. */}}
{{- define "trellis.hasSecret" -}}
{{- if or (and .Values.database.url (not .Values.database.existingSecret)) .Values.redis.url .Values.signingKeys }}true{{ end }}
{{- end }}

{{/* The Secret and key holding TRELLIS_DATABASE_URL (PostgreSQL mode). */}}
{{- define "trellis.databaseSecretName" -}}
{{- default (include "trellis.secretName" .) .Values.database.existingSecret }}
{{- end }}
{{- define "trellis.databaseSecretKey" -}}
{{- if .Values.database.existingSecret }}{{ .Values.database.existingSecretKey }}{{ else }}database-url{{ end }}
{{- end }}

{{/* The coordinator's in-cluster gRPC address, HOST:PORT (its Service). */}}
{{- define "trellis.coordinatorAddress" -}}
{{- printf "%s:%d" (include "trellis.componentName" (list . "coordinator")) (int .Values.coordinator.service.port) }}
{{- end }}

{{/*
A Trellis duration (250ms, 30s, 5m, 1h or a number of seconds) as whole seconds, rounded up.
*/}}
{{- define "trellis.durationSeconds" -}}
{{- $raw := toString . | trim }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $raw }}
{{- $unit := trimPrefix $number $raw }}
{{- $scale := dict "" 1.0 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 }}
{{- if or (not $number) (not (hasKey $scale $unit)) }}
{{- fail (printf "%q is not a duration; use e.g. 250ms, 30s, 5m or 1h" $raw) }}
{{- end }}
{{- mulf (float64 $number) (get $scale $unit) | ceil | int }}
{{- end }}

{{/* Pod-level securityContext, shared by every pod. */}}
{{- define "trellis.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level securityContext, shared by every container. */}}
{{- define "trellis.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Pod-spec fields every Trellis pod shares: no service links (Kubernetes would otherwise inject
TRELLIS_COORDINATOR_SERVICE_HOST and the like, which the coordinator refuses as unknown
TRELLIS_* settings), no API token, the pull secrets and the securityContext.
*/}}
{{- define "trellis.podCommon" -}}
enableServiceLinks: false
automountServiceAccountToken: false
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "trellis.podSecurityContext" . | nindent 2 }}
{{- end }}

{{/* The writable /tmp every container gets (the root filesystem is read-only). */}}
{{- define "trellis.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}
{{- define "trellis.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/*
TLS. The coordinator's certificate, key and client CA are mounted on trellis.tlsDir; the CA and
client certificate its clients (gateway, example worker) use on trellis.clientTlsDir. Projected
volumes, never subPath: Kubernetes then updates the files in place when the Secrets change.
*/}}
{{- define "trellis.tlsDir" -}}/etc/trellis/tls{{- end }}
{{- define "trellis.clientTlsDir" -}}/etc/trellis/coordinator-tls{{- end }}

{{/* The coordinator's TLS volume: tls.crt and tls.key, and client-ca.crt for mutual TLS. */}}
{{- define "trellis.coordinatorTlsVolume" -}}
{{- $tls := .Values.tls -}}
- name: tls
  projected:
    defaultMode: 0440
    sources:
      - secret:
          name: {{ $tls.existingSecret }}
          items:
            - key: tls.crt
              path: tls.crt
            - key: tls.key
              path: tls.key
      {{- if $tls.clientCA.enabled }}
      - secret:
          name: {{ default $tls.existingSecret $tls.clientCA.existingSecret }}
          items:
            - key: {{ $tls.clientCA.key }}
              path: client-ca.crt
      {{- end }}
{{- end }}

{{/*
A client's TLS volume: ca.crt (the CA that signed the coordinator's certificate) and, for
mutual TLS, the client's own tls.crt and tls.key from the Secret given as the second argument:
include "trellis.clientTlsVolume" (list $ .Values.tls.clientCA.gatewaySecret)
*/}}
{{- define "trellis.clientTlsVolume" -}}
{{- $root := index . 0 }}
{{- $clientSecret := index . 1 }}
{{- $tls := $root.Values.tls -}}
- name: coordinator-tls
  projected:
    defaultMode: 0440
    sources:
      - secret:
          name: {{ default $tls.existingSecret $tls.caSecret }}
          items:
            - key: {{ $tls.caKey }}
              path: ca.crt
      {{- if $tls.clientCA.enabled }}
      - secret:
          name: {{ $clientSecret }}
          items:
            - key: tls.crt
              path: tls.crt
            - key: tls.key
              path: tls.key
      {{- end }}
{{- end }}

{{/* Read-only mounts of those volumes. */}}
{{- define "trellis.coordinatorTlsMount" -}}
- name: tls
  mountPath: {{ include "trellis.tlsDir" . }}
  readOnly: true
{{- end }}
{{- define "trellis.clientTlsMount" -}}
- name: coordinator-tls
  mountPath: {{ include "trellis.clientTlsDir" . }}
  readOnly: true
{{- end }}

{{/*
An env entry read from an existing Secret: include "trellis.secretEnv" (list "NAME" .Values.auth.x)
where x is {existingSecret, key}; nothing when existingSecret is empty.
*/}}
{{- define "trellis.secretEnv" -}}
{{- $name := index . 0 }}
{{- $ref := index . 1 }}
{{- if $ref.existingSecret -}}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.existingSecret }}
      key: {{ $ref.key }}
{{- end }}
{{- end }}

{{/*
Checks that need more than one value; values.schema.json checks the rest. Rendered by
configmap.yaml, so every install and upgrade runs them.
*/}}
{{- define "trellis.validate" -}}
{{- $v := .Values }}
{{- if and $v.database.url $v.database.existingSecret }}
{{- fail "database: set database.url or database.existingSecret, not both" }}
{{- end }}
{{- if include "trellis.sqlite" . }}
{{- if gt (int $v.coordinator.replicas) 1 }}
{{- fail (printf "coordinator.replicas=%d needs PostgreSQL: SQLite serves one coordinator; set database.url (postgresql://...) or database.existingSecret" (int $v.coordinator.replicas)) }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- fail "autoscaling.enabled needs PostgreSQL: SQLite serves one coordinator; set database.url (postgresql://...) or database.existingSecret" }}
{{- end }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- if gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- end }}
{{- $requests := default dict $v.coordinator.resources.requests }}
{{- if and (not $v.autoscaling.targetCPUUtilizationPercentage) (not $v.autoscaling.targetMemoryUtilizationPercentage) }}
{{- fail "autoscaling.enabled needs autoscaling.targetCPUUtilizationPercentage or autoscaling.targetMemoryUtilizationPercentage" }}
{{- end }}
{{- if and $v.autoscaling.targetCPUUtilizationPercentage (not $requests.cpu) }}
{{- fail "autoscaling.targetCPUUtilizationPercentage needs coordinator.resources.requests.cpu" }}
{{- end }}
{{- if and $v.autoscaling.targetMemoryUtilizationPercentage (not $requests.memory) }}
{{- fail "autoscaling.targetMemoryUtilizationPercentage needs coordinator.resources.requests.memory" }}
{{- end }}
{{- end }}
{{- if and $v.pdb.enabled (not (kindIs "invalid" $v.pdb.minAvailable)) (not (kindIs "invalid" $v.pdb.maxUnavailable)) }}
{{- fail "pdb: set pdb.maxUnavailable or pdb.minAvailable, not both (set the other to null)" }}
{{- end }}
{{- if and $v.pdb.enabled (kindIs "invalid" $v.pdb.minAvailable) (kindIs "invalid" $v.pdb.maxUnavailable) }}
{{- fail "pdb.enabled needs pdb.maxUnavailable or pdb.minAvailable" }}
{{- end }}
{{- if and $v.gateway.ingress.enabled (not $v.gateway.enabled) }}
{{- fail "gateway.ingress.enabled needs gateway.enabled" }}
{{- end }}
{{- if and $v.serviceMonitor.enabled (not $v.gateway.enabled) }}
{{- fail "serviceMonitor.enabled needs gateway.enabled (it scrapes the gateway's HTTP port)" }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret: a Secret with tls.crt and tls.key (and ca.crt for the gateway), see values.yaml" }}
{{- end }}
{{- if and $v.tls.clientCA.enabled (not $v.tls.enabled) }}
{{- fail "tls.clientCA.enabled (mutual TLS) needs tls.enabled" }}
{{- end }}
{{- if and $v.tls.clientCA.enabled $v.gateway.enabled (not $v.tls.clientCA.gatewaySecret) }}
{{- fail "tls.clientCA.enabled needs tls.clientCA.gatewaySecret: with mutual TLS the coordinator refuses the gateway without a client certificate (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if and $v.tls.clientCA.enabled $v.worker.enabled (not $v.tls.clientCA.workerSecret) }}
{{- fail "tls.clientCA.enabled needs tls.clientCA.workerSecret: with mutual TLS the coordinator refuses the example worker without a client certificate (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- with $v.auth.oidc }}
{{- if and .issuer (not (and .audience .jwksUrl)) }}
{{- fail "auth.oidc.issuer needs auth.oidc.audience and auth.oidc.jwksUrl" }}
{{- end }}
{{- end }}
{{- if and $v.gateway.enabled (ge (int $v.gateway.preStopSleepSeconds) (int $v.gateway.terminationGracePeriodSeconds)) }}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%d) must exceed gateway.preStopSleepSeconds (%d)" (int $v.gateway.terminationGracePeriodSeconds) (int $v.gateway.preStopSleepSeconds)) }}
{{- end }}
{{- end }}
