{{/* The chart name, or nameOverride. */}}
{{- define "flyprobe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The resources' name: the release name, with the chart name unless it contains it. */}}
{{- define "flyprobe.fullname" -}}
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

{{- define "flyprobe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flyprobe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flyprobe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "flyprobe.labels" -}}
helm.sh/chart: {{ include "flyprobe.chart" . }}
{{ include "flyprobe.selectorLabels" . }}
app.kubernetes.io/component: probe
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "flyprobe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The TCP port of .Values.listen ("0.0.0.0:9464", "[::]:9464"). */}}
{{- define "flyprobe.port" -}}
{{- if not (regexMatch "^(\\[[0-9A-Fa-f:.]+\\]|[0-9.]+|[A-Za-z0-9.-]+):[0-9]{1,5}$" (toString .Values.listen)) }}
{{- fail (printf "listen: %q is not HOST:PORT (e.g. 0.0.0.0:9464 or [::]:9464)" (toString .Values.listen)) }}
{{- end }}
{{- regexFind "[0-9]+$" .Values.listen }}
{{- end }}

{{/* The web config in use: the chart's Secret, an existing one, or none (""). */}}
{{- define "flyprobe.webConfigSecret" -}}
{{- if and .Values.webConfig.config .Values.webConfig.existingSecret }}
{{- fail "webConfig: set either config or existingSecret, not both" }}
{{- end }}
{{- if .Values.webConfig.existingSecret }}
{{- .Values.webConfig.existingSecret }}
{{- else if .Values.webConfig.config }}
{{- printf "%s-web-config" (include "flyprobe.fullname" .) }}
{{- end }}
{{- end }}

{{/* "true" when the endpoint serves HTTPS. */}}
{{- define "flyprobe.tls" -}}
{{- if or .Values.webConfig.tlsSecret (hasKey (.Values.webConfig.config | default dict) "tls_server_config") }}true{{ end }}
{{- end }}

{{/* flyprobe's command line. */}}
{{- define "flyprobe.args" -}}
{{- $s := .Values.selectors }}
{{- if not (or $s.allListeners $s.pidTree $s.ports $s.comms $s.cgroups) }}
{{- fail "selectors: set at least one of allListeners, pidTree, ports, comms, cgroups" }}
{{- end }}
{{- if $s.allListeners }}
- --all-listeners
{{- end }}
{{- range $s.pidTree }}
- --pid-tree
- {{ int64 . | quote }}
{{- end }}
{{- range $s.ports }}
- --port
- {{ int64 . | quote }}
{{- end }}
{{- range $s.comms }}
- --comm
- {{ . | quote }}
{{- end }}
{{- range $s.cgroups }}
- --cgroup
- {{ . | quote }}
{{- end }}
- --listen
- {{ .Values.listen | quote }}
{{- with .Values.serverName }}
- --server-name
- {{ . | quote }}
{{- end }}
{{- with .Values.maxConnections }}
- --max-connections
- {{ int64 . | quote }}
{{- end }}
{{- with .Values.maxProcesses }}
- --max-processes
- {{ int64 . | quote }}
{{- end }}
{{- with .Values.maxRequestSeries }}
- --max-request-series
- {{ int64 . | quote }}
{{- end }}
{{- with .Values.accessLog }}
- --access-log
- {{ . | quote }}
{{- end }}
{{- with .Values.pinPath }}
{{- if not (hasPrefix "/sys/fs/bpf/" .) }}
{{- fail (printf "pinPath: %q must be a directory under /sys/fs/bpf/" .) }}
{{- end }}
- --pin-path
- {{ . | quote }}
{{- end }}
{{- if include "flyprobe.webConfigSecret" . }}
- --web.config.file
- /etc/flyprobe/web/web-config.yml
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* The probes' handler: see probes.type in values.yaml. */}}
{{- define "flyprobe.probeHandler" -}}
{{- $type := .Values.probes.type }}
{{- if eq $type "auto" }}
{{- $config := .Values.webConfig.config | default dict }}
{{- if or .Values.webConfig.existingSecret (hasKey $config "basic_auth_users") (hasKey $config "bearer_tokens") }}
{{- $type = "tcpSocket" }}
{{- else }}
{{- $type = "httpGet" }}
{{- end }}
{{- end }}
{{- if eq $type "httpGet" }}
httpGet:
  path: /metrics
  port: metrics
  scheme: {{ if include "flyprobe.tls" . }}HTTPS{{ else }}HTTP{{ end }}
{{- else if eq $type "tcpSocket" }}
tcpSocket:
  port: metrics
{{- else }}
{{- fail (printf "probes.type: %q is not auto, httpGet or tcpSocket" $type) }}
{{- end }}
{{- end }}
