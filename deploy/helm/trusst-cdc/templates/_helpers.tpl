{{/* Names and labels. */}}
{{- define "trusst-cdc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "trusst-cdc.fullname" -}}
{{- if contains (include "trusst-cdc.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "trusst-cdc.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "trusst-cdc.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "trusst-cdc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trusst-cdc
{{- end -}}

{{- define "trusst-cdc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "trusst-cdc.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "trusst-cdc.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The customer's slot: source.slot, default trusst_cdc_<name> ('-' as '_'). */}}
{{- define "trusst-cdc.slot" -}}
{{- $src := .source | default dict -}}
{{- default (printf "trusst_cdc_%s" (.name | replace "-" "_")) $src.slot -}}
{{- end -}}

{{- define "trusst-cdc.topic" -}}
{{- default (printf "trusst.%s.contacts" .name) .topic -}}
{{- end -}}

{{/*
TOML from a map, for the connector's config files. Helm's toToml writes every number as a
float (6.0), which the connector's integer keys refuse; this writes whole numbers as integers.
Tables come after the plain keys of their parent, as [dotted.path] headers; a null value is left
out (so a customer can unset a key).
*/}}
{{- define "trusst-cdc.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "trusst-cdc.toml.value" -}}
{{- if kindIs "string" . -}}{{ toJson . }}
{{- else if kindIs "bool" . -}}{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- if eq (float64 (int64 .)) (float64 .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if kindIs "slice" . -}}[{{- range $i, $e := . -}}{{ if $i }}, {{ end }}{{ include "trusst-cdc.toml.value" $e }}{{- end -}}]
{{- else if kindIs "map" . -}}{ {{- $first := true -}}{{- range $k, $v := . -}}{{- if not (kindIs "invalid" $v) -}}{{ if not $first }}, {{ end }}{{ $first = false }}{{ include "trusst-cdc.toml.key" $k }} = {{ include "trusst-cdc.toml.value" $v }}{{- end -}}{{- end -}} }
{{- else -}}{{ fail (printf "cannot write %v (%s) as TOML" . (kindOf .)) }}
{{- end -}}
{{- end -}}

{{/* dict "path" (list ...) "table" map */}}
{{- define "trusst-cdc.toml.table" -}}
{{- $path := .path -}}
{{- range $k, $v := .table -}}
{{- if and (not (kindIs "map" $v)) (not (kindIs "invalid" $v)) }}
{{ include "trusst-cdc.toml.key" $k }} = {{ include "trusst-cdc.toml.value" $v }}
{{- end -}}
{{- end -}}
{{- range $k, $v := .table -}}
{{- if kindIs "map" $v -}}
{{- $sub := append $path (include "trusst-cdc.toml.key" $k) }}

[{{ join "." $sub }}]
{{- include "trusst-cdc.toml.table" (dict "path" $sub "table" $v) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "trusst-cdc.toml" -}}
{{- include "trusst-cdc.toml.table" (dict "path" list "table" .) | trimPrefix "\n" -}}
{{- end -}}

{{/* Pod and container settings shared by sources and sinks. */}}
{{- define "trusst-cdc.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "trusst-cdc.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* /health for liveness (and start-up), /ready for readiness, on the metrics port. */}}
{{- define "trusst-cdc.probes" -}}
startupProbe:
  httpGet:
    path: /health
    port: metrics
  periodSeconds: 5
  failureThreshold: 60
livenessProbe:
  httpGet:
    path: /health
    port: metrics
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
readinessProbe:
  httpGet:
    path: /ready
    port: metrics
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
{{- end -}}

{{/* Kafka SASL and schema registry credentials, from Secrets. */}}
{{- define "trusst-cdc.sharedSecretEnv" -}}
{{- with .Values.kafka.sasl }}{{ if .secretName }}
- name: KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .usernameKey }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .passwordKey }}
{{- end }}{{ end }}
{{- with .Values.schemaRegistry.auth }}{{ if .secretName }}
{{- if .tokenKey }}
- name: SCHEMA_REGISTRY_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .tokenKey }}
{{- else }}
- name: SCHEMA_REGISTRY_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .usernameKey }}
- name: SCHEMA_REGISTRY_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .passwordKey }}
{{- end }}
{{- end }}{{ end }}
{{- end -}}

{{/* [kafka] shared by a customer's source and sinks. */}}
{{- define "trusst-cdc.kafkaSection" -}}
{{- $v := .Values -}}
{{- $k := dict "brokers" (required "kafka.brokers is required" $v.kafka.brokers) -}}
{{- if $v.schemaRegistry.url -}}
{{- if regexMatch "^[a-z]+://[^/]*@" $v.schemaRegistry.url -}}
{{- fail "schemaRegistry.url carries credentials: put them in a Secret and name it in schemaRegistry.auth" -}}
{{- end -}}
{{- $_ := set $k "schema_registry_url" $v.schemaRegistry.url -}}
{{- end -}}
{{- if $v.kafka.properties -}}
{{- range $p, $_ := $v.kafka.properties -}}
{{- if regexMatch "(password|secret|\\.key$|token)" $p -}}
{{- fail (printf "kafka.properties.%s is a credential: give it through kafka.sasl (a Secret) instead" $p) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $k "properties" $v.kafka.properties -}}
{{- end -}}
{{- toJson $k -}}
{{- end -}}

{{/*
Refuse a credential written inline in a config map: a key that holds a secret must not be
given a value here (the chart sets it from a Secret).
*/}}
{{- define "trusst-cdc.noInlineSecrets" -}}
{{- $where := .where -}}
{{- range $k, $v := .table -}}
{{- if has $k (list "client_secret" "private_key" "password" "database_url" "url_secret" "schema_registry_password" "schema_registry_token") -}}
{{- fail (printf "%s.%s: credentials come from Secrets only (clientSecret, privateKey, auditDatabaseUrl, database.urlSecret), never inline" $where $k) -}}
{{- end -}}
{{- if kindIs "map" $v -}}
{{- include "trusst-cdc.noInlineSecrets" (dict "where" (printf "%s.%s" $where $k) "table" $v) -}}
{{- end -}}
{{- end -}}
{{- end -}}
