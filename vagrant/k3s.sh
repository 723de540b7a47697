#!/usr/bin/env bash
# The k3s VM: builds the mesh's image, installs k3s and deploy/ (through the k3s overlay in
# vagrant/k3s/), then runs Consul's Kubernetes tutorial on it: web -> api-v1 is denied (500),
# a ServiceIntentions object allows it (200). Re-running it re-applies everything.
set -euxo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends ca-certificates curl podman jq
mount | grep -q ' type bpf ' || mount -t bpf bpf /sys/fs/bpf

# The image, as `cargo xtask image` builds it (podman here), named as deploy/ refers to it
# (meshd:latest is docker.io/library/meshd:latest to containerd), then handed to k3s.
podman build --tag docker.io/library/meshd:latest --file /mesh/Dockerfile /mesh

if ! command -v k3s >/dev/null; then
  curl -sfL https://get.k3s.io | INSTALL_K3S_EXEC="--disable=traefik --write-kubeconfig-mode=0644" sh -
fi
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
podman save docker.io/library/meshd:latest | k3s ctr images import -
kubectl wait --for=condition=Ready node --all --timeout=300s

# deploy/ outside the synced folder: the root key must be 0600, which shared folders ignore.
work=/root/mesh-deploy
rm -rf "$work" && mkdir -p "$work"
cp -r /mesh/deploy "$work/deploy"
cp -r /mesh/vagrant/k3s "$work/k3s"
podman run --rm -v "$work/deploy/ca:/ca" docker.io/library/meshd:latest ca --init --root-dir /ca >/dev/null
kubectl apply -k "$work/k3s"
kubectl -n mesh-system rollout status deployment/meshd-ca --timeout=300s
kubectl -n mesh-system rollout status daemonset/meshd --timeout=300s

# The tutorial.
kubectl apply -f /mesh/examples/api-v1.yaml -f /mesh/examples/web.yaml
kubectl rollout status deployment/api-v1 --timeout=300s
kubectl rollout status deployment/web --timeout=300s
kubectl port-forward service/web 9090:9090 >/tmp/port-forward.log 2>&1 &
pf=$!
trap 'kill $pf' EXIT
sleep 3
code() { curl -s -o /dev/null -w '%{http_code}' localhost:9090; }
kubectl delete -f "$work/k3s/api-v1-intentions.yaml" --ignore-not-found
sleep 2
test "$(code)" = 500 || { echo "expected 500 under deny-all"; exit 1; }
kubectl apply -f "$work/k3s/api-v1-intentions.yaml"
for _ in $(seq 30); do [ "$(code)" = 200 ] && break; sleep 1; done
test "$(code)" = 200 || { echo "expected 200 once web -> api-v1 is allowed"; exit 1; }
kubectl get serviceintentions
echo "tutorial done: 500 under deny-all, 200 with the ServiceIntentions object"
