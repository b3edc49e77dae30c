{{/* Names and labels shared by every template. */}}

{{- define "loraplex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraplex.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "loraplex.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "loraplex.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "loraplex.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "loraplex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels of a pod template: the selector labels plus chart and version. */}}
{{- define "loraplex.podLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{ include "loraplex.selectorLabels" . }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "router"). */}}
{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplex.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The vLLM replicas' headless Service: one DNS A record per ready pod. */}}
{{- define "loraplex.vllmHeadlessService" -}}
{{- printf "%s-vllm-headless" (include "loraplex.fullname" .) -}}
{{- end -}}

{{/* The router's backend_discovery setting: dns:<headless service>.<namespace>.svc:<port>. */}}
{{- define "loraplex.backendDiscovery" -}}
{{- printf "dns:%s.%s.svc:%v" (include "loraplex.vllmHeadlessService" .) .Release.Namespace .Values.vllm.port -}}
{{- end -}}

{{- define "loraplex.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion .Values.image.flavour) .Values.image.tag -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "loraplex.secretName" -}}
{{- printf "%s-secrets" (include "loraplex.fullname" .) -}}
{{- end -}}

{{- define "loraplex.sharedDataClaim" -}}
{{- default (printf "%s-data" (include "loraplex.fullname" .)) .Values.sharedData.persistence.existingClaim -}}
{{- end -}}

{{/* The database URL from values, or "" (then the router uses SQLite on sharedData). */}}
{{- define "loraplex.databaseUrl" -}}
{{- $db := .Values.database -}}
{{- if $db.url -}}
{{- $db.url -}}
{{- else if $db.postgresql.host -}}
{{- $pg := $db.postgresql -}}
{{- printf "postgresql+psycopg://%s:%s@%s:%v/%s?sslmode=%s" (urlquery $pg.user) (urlquery $pg.password) $pg.host $pg.port $pg.database $pg.sslmode -}}
{{- end -}}
{{- end -}}

{{/* True when the router needs a database shared by several processes. */}}
{{- define "loraplex.multiRouter" -}}
{{- if or (gt (int .Values.router.replicas) 1) .Values.router.autoscaling.enabled -}}true{{- end -}}
{{- end -}}

{{/* Secret environment of the router: admin key and database URL. */}}
{{- define "loraplex.routerSecretEnv" -}}
- name: LORAPLEX_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ default (include "loraplex.secretName" .) .Values.auth.existingSecret }}
      key: admin-key
{{- if or .Values.database.existingSecret (include "loraplex.databaseUrl" .) }}
- name: LORAPLEX_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "loraplex.secretName" .) .Values.database.existingSecret }}
      key: database-url
{{- end }}
{{- end -}}

{{/* Object-store credentials: both roles read adapters from the registry store. */}}
{{- define "loraplex.storeSecretEnv" -}}
{{- if or .Values.registry.s3.existingSecret .Values.registry.s3.accessKeyId }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ default (include "loraplex.secretName" .) .Values.registry.s3.existingSecret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ default (include "loraplex.secretName" .) .Values.registry.s3.existingSecret }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- end -}}

{{- define "loraplex.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Root filesystem stays writable: torch, Triton and vLLM write caches under $HOME. */}}
{{- define "loraplex.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}
