#!/bin/sh
# The DaemonSet's init container: installs mesh-cni into the node's CNI plugin directory and
# chains {"type": "mesh-cni"} last into the node's CNI configuration, the first file of
# $CNI_CONF_DIR in lexical order as container runtimes pick it. Idempotent; a single-plugin
# .conf is turned into a .conflist holding it. Waits (up to $CNI_CONF_WAIT seconds) for the
# cluster's CNI to write its configuration first.
set -eu

bin_dir=${CNI_BIN_DIR:-/host/opt/cni/bin}
conf_dir=${CNI_CONF_DIR:-/host/etc/cni/net.d}
wait_secs=${CNI_CONF_WAIT:-300}
plugin=${MESH_CNI_BINARY:-/usr/local/bin/mesh-cni}

mkdir -p "$bin_dir"
install -m 0755 "$plugin" "$bin_dir/.mesh-cni.new"
mv -f "$bin_dir/.mesh-cni.new" "$bin_dir/mesh-cni"
echo "installed $bin_dir/mesh-cni"

first_conf() {
    find "$conf_dir" -maxdepth 1 -type f \( -name '*.conflist' -o -name '*.conf' -o -name '*.json' \) \
        -printf '%f\n' 2>/dev/null | LC_ALL=C sort | head -n 1
}

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
path="$conf_dir/$conf"

if ! jq -e . "$path" >/dev/null 2>&1; then
    echo "$path is not JSON" >&2
    exit 1
fi

case "$conf" in
    *.conflist) ;;
    *)
        # A single plugin's configuration: the same plugin in a list.
        list="$conf_dir/${conf%.*}.conflist"
        jq '{cniVersion: .cniVersion, name: .name, plugins: [del(.cniVersion, .name)]}' "$path" > "$list.new"
        mv -f "$list.new" "$list"
        rm -f "$path"
        path=$list
        ;;
esac

if jq -e '.plugins | map(.type) | index("mesh-cni")' "$path" >/dev/null; then
    echo "mesh-cni is already chained in $path"
    exit 0
fi
if ! jq -e '.plugins | type == "array"' "$path" >/dev/null; then
    echo "$path has no plugins list" >&2
    exit 1
fi
jq '.plugins += [{"type": "mesh-cni"}]' "$path" > "$path.mesh-new"
mv -f "$path.mesh-new" "$path"
echo "chained mesh-cni last in $path"
