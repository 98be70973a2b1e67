#!/usr/bin/env bash
# Checks the deployment files without a cluster or a Docker engine:
#   - the Helm chart (deploy/helm/trusst-cdc): `helm lint` and `helm template` for every values
#     file in its ci/ folder, the rendered manifests validated against the Kubernetes schemas
#     with kubernetes-validate (custom resources: tests/helm.rs, against their CRD schema);
#   - the alert rules (deploy/alerts): `promtool check rules` and `promtool test rules`;
#   - the compose file's Prometheus config (deploy/prometheus): `promtool check config`.
#
# helm and promtool are built once from the Go module proxy into .cache/tools/bin (a few minutes
# each on two cores; rebuilt when the pins below change); kubernetes-validate comes from PyPI
# into .cache/kubernetes-validate-venv. The rendered manifests are left in .run/helm/ for
# tests/helm.rs.
#
#   scripts/deploy-check.sh            everything
#   scripts/deploy-check.sh tools      only build or find the tools
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_VERSION=v3.22.0                 # helm.sh/helm/v3
PROMTOOL_VERSION=v0.316.0            # github.com/prometheus/prometheus (Prometheus v3.16.0)
KUBERNETES_VALIDATE_VERSION=1.37.0
# The Kubernetes version the chart is rendered and validated for.
KUBE_VERSION=${KUBE_VERSION:-1.33.0}

tools=$PWD/.cache/tools/bin
mkdir -p "$tools"

# go install PACKAGE@VERSION into .cache/tools/bin, unless that version is there already.
go_tool() {
    local name=$1 package=$2 version=$3
    if [[ -x $tools/$name && $(cat "$tools/$name.version" 2>/dev/null) == "$version" ]]; then
        return
    fi
    echo "deploy-check: building $name $version from the Go module proxy (once; minutes)" >&2
    rm -f "$tools/$name.version"
    GOBIN=$tools GOFLAGS=-trimpath go install "$package@$version"
    echo "$version" >"$tools/$name.version"
}
go_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
go_tool promtool github.com/prometheus/prometheus/cmd/promtool "$PROMTOOL_VERSION"

venv=.cache/kubernetes-validate-venv
if [[ ! -x $venv/bin/kubernetes-validate ]] ||
    [[ $($venv/bin/pip show kubernetes-validate 2>/dev/null) != *"Version: $KUBERNETES_VALIDATE_VERSION"* ]]; then
    echo "deploy-check: installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION from PyPI into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2
fi
[[ ${1:-} == tools ]] && exit 0

chart=deploy/helm/trusst-cdc
out=.run/helm
rm -rf "$out"
mkdir -p "$out"
# helm says on stderr that it follows the chart's links to the rules and the dashboard.
quiet() { "$@" 2> >(grep -v 'found symbolic link in path' >&2); }
for values in "$chart"/ci/*-values.yaml; do
    name=$(basename "$values" -values.yaml)
    echo "deploy-check: helm lint and template, $name" >&2
    quiet "$tools/helm" lint --strict --quiet --kube-version "$KUBE_VERSION" "$chart" -f "$values" >/dev/null
    quiet "$tools/helm" template trusst-cdc "$chart" --namespace trusst --kube-version "$KUBE_VERSION" \
        -f "$values" >"$out/$name.yaml"
done
echo "deploy-check: kubernetes-validate --strict (Kubernetes $KUBE_VERSION)" >&2
# It knows the built-in kinds only (it warns of no schema for the others, hence --no-warn);
# ServiceMonitor and PrometheusRule are checked against their CRD schema by tests/helm.rs.
"$venv/bin/kubernetes-validate" --strict --quiet --no-warn -k "$KUBE_VERSION" "$out"/*.yaml

echo "deploy-check: promtool check and test the alert rules, check the compose Prometheus config" >&2
"$tools/promtool" check rules deploy/alerts/trusst-cdc.rules.yml >/dev/null
"$tools/promtool" test rules deploy/alerts/trusst-cdc.rules.test.yml
"$tools/promtool" check config deploy/prometheus/prometheus.yml >/dev/null
echo "deploy-check: passed" >&2
