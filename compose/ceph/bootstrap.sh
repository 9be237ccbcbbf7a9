#!/bin/sh
# Bring up (first start) or restart (data kept on /var/lib/ceph) a single-node cluster, create dicomflow's
# pools, publish ceph.conf + keyring on /etc/ceph for the dicomflow containers, then wait.
set -eu
D=/var/lib/ceph/demo
ETC=/etc/ceph
IP=$(hostname -i | cut -d' ' -f1)
mkdir -p "$D/mon.a" "$D/mgr.x" "$D/run" "$D/log"
if [ ! -f "$D/ceph.conf" ]; then
    FSID=$(uuidgen)
    cat > "$D/ceph.conf" <<CONF
[global]
fsid = $FSID
mon host = $IP
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $D/keyring
run dir = $D/run
log file = $D/log/\$name.log
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd pool default pg num = 16
[mon]
mon data = $D/\$name
paxos propose interval = 0.05
[mgr]
mgr data = $D/\$name
[osd]
osd data = $D/\$name
osd objectstore = bluestore
bluestore block path = $D/\$name/block.img
bluestore block create = true
bluestore block size = 10737418240
osd memory target = 1073741824
CONF
    ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *'
    ceph-authtool "$D/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *'
    monmaptool --create --fsid "$FSID" --addv a "[v2:$IP:3300,v1:$IP:6789]" "$D/monmap"
    ceph-mon -c "$D/ceph.conf" -i a --mkfs --monmap "$D/monmap" --keyring "$D/keyring"
fi
ceph-mon -c "$D/ceph.conf" -i a
C="ceph -c $D/ceph.conf"
for i in 0 1 2; do
    if [ ! -d "$D/osd.$i" ]; then
        mkdir -p "$D/osd.$i"
        U=$(uuidgen); K=$(ceph-authtool --gen-print-key)
        echo "{\"cephx_secret\": \"$K\"}" > "$D/osd.$i/new.json"
        $C osd new "$U" "$i" -i "$D/osd.$i/new.json"
        printf '[osd.%s]\n\tkey = %s\n' "$i" "$K" > "$D/osd.$i/keyring"
        ceph-osd -c "$D/ceph.conf" -i "$i" --mkfs --key "$K" --osd-uuid "$U"
    fi
    ceph-osd -c "$D/ceph.conf" -i "$i" --keyring "$D/osd.$i/keyring"
done
[ -f "$D/mgr.x/keyring" ] || $C auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' -o "$D/mgr.x/keyring"
ceph-mgr -c "$D/ceph.conf" -i x --keyring "$D/mgr.x/keyring"
for pool in dicomflow-staging dicomflow-all-dc dicomflow-regional-a; do
    $C osd pool create "$pool" 16 16 replicated --size 1 --autoscale-mode off 2>/dev/null || true
    $C osd pool application enable "$pool" dicomflow >/dev/null 2>&1 || true
done
printf '[global]\nmon host = %s\n' "$IP" > "$ETC/ceph.conf"
$C auth get client.admin -o "$ETC/keyring"
chmod 0644 "$ETC/ceph.conf" "$ETC/keyring"
touch "$ETC/ready"
echo "ceph ready on $IP"
# The daemons forked into the background; stay up while the mon lives.
while pgrep -x ceph-mon >/dev/null; do sleep 5; done
