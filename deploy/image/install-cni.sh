#!/bin/sh
# The DaemonSet's CNI installer (a native sidecar: an init container with restartPolicy Always).
# Installs mesh-cni into the node's CNI plugin directory and chains {"type": "mesh-cni"} last
# into the node's CNI configuration, the first file of $CNI_CONF_DIR in lexical order as
# container runtimes pick it. Idempotent; a single-plugin .conf is turned into a .conflist
# holding it. Waits (up to $CNI_CONF_WAIT seconds) for the cluster's CNI to write its
# configuration first.
#
# With --watch it then keeps checking every $CNI_WATCH_INTERVAL seconds and chains mesh-cni
# again when the cluster's CNI rewrites its configuration without it (as CNI daemons do on
# restart or upgrade), or puts another file first. It touches $CNI_READY_FILE once mesh-cni is
# chained (the sidecar's startup probe) and exits non-zero on anything it cannot fix.
set -eu

bin_dir=${CNI_BIN_DIR:-/host/opt/cni/bin}
conf_dir=${CNI_CONF_DIR:-/host/etc/cni/net.d}
wait_secs=${CNI_CONF_WAIT:-300}
interval=${CNI_WATCH_INTERVAL:-5}
ready_file=${CNI_READY_FILE:-/tmp/mesh-cni-chained}
plugin=${MESH_CNI_BINARY:-/usr/local/bin/mesh-cni}

watch=false
case "${1:-}" in
    --watch) watch=true ;;
    "") ;;
    *)
        echo "usage: install-cni [--watch]" >&2
        exit 2
        ;;
esac

install_binary() {
    mkdir -p "$bin_dir"
    install -m 0755 "$plugin" "$bin_dir/.mesh-cni.new"
    mv -f "$bin_dir/.mesh-cni.new" "$bin_dir/mesh-cni"
}

first_conf() {
    find "$conf_dir" -maxdepth 1 -type f \( -name '*.conflist' -o -name '*.conf' -o -name '*.json' \) \
        -printf '%f\n' 2>/dev/null | LC_ALL=C sort | head -n 1
}

# Chains mesh-cni into the first configuration; prints what it did, or nothing when it was
# chained already.
chain() {
    conf=$1
    path="$conf_dir/$conf"
    if ! jq -e . "$path" >/dev/null 2>&1; then
        echo "$path is not JSON" >&2
        return 1
    fi
    case "$conf" in
        *.conflist) ;;
        *)
            # A single plugin's configuration: the same plugin in a list.
            list="$conf_dir/${conf%.*}.conflist"
            jq '{cniVersion: .cniVersion, name: .name, plugins: [del(.cniVersion, .name)]}' "$path" > "$list.new"
            mv -f "$list.new" "$list"
            rm -f "$path"
            echo "turned $path into $list"
            path=$list
            ;;
    esac
    if jq -e '.plugins | map(.type) | index("mesh-cni")' "$path" >/dev/null; then
        return 0
    fi
    if ! jq -e '.plugins | type == "array"' "$path" >/dev/null; then
        echo "$path has no plugins list" >&2
        return 1
    fi
    jq '.plugins += [{"type": "mesh-cni"}]' "$path" > "$path.mesh-new"
    mv -f "$path.mesh-new" "$path"
    echo "chained mesh-cni last in $path"
}

install_binary
echo "installed $bin_dir/mesh-cni"

waited=0
conf=$(first_conf)
while [ -z "$conf" ]; do
    if [ "$waited" -ge "$wait_secs" ]; then
        echo "no CNI configuration in $conf_dir after ${wait_secs}s: install the cluster's CNI first" >&2
        exit 1
    fi
    sleep 2
    waited=$((waited + 2))
    conf=$(first_conf)
done
done_msg=$(chain "$conf")
echo "${done_msg:-mesh-cni is already chained in $conf_dir/$conf}"
touch "$ready_file"

if [ "$watch" = false ]; then
    exit 0
fi
while sleep "$interval"; do
    [ -x "$bin_dir/mesh-cni" ] || { install_binary; echo "re-installed $bin_dir/mesh-cni"; }
    conf=$(first_conf)
    if [ -z "$conf" ]; then
        # The cluster's CNI removed its configuration (uninstall, or mid-rewrite): nothing to
        # chain into; the runtime cannot start pods either.
        continue
    fi
    chain "$conf"
done
