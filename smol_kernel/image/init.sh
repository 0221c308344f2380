#!/bin/busybox sh
# smol-kernel initramfs /init: load the few modules the guest needs, mount the read-only
# root image with a per-VM writable overlay on top, and hand PID 1 to the guest agent.
# Kernel command line knobs: smol.probe=1 (KVM probe: print a marker and power off).
# Environment (name=value words on the kernel command line, or libkrun's exec env):
#   SMOL_NET=ADDR/PREFIX,GATEWAY,DNS[,DNS..]  configure eth0 (per-VM passt), resolv.conf
#   SMOL_SHARES=TAG:GUESTPATH:ro|rw,... mount host shares (9p under QEMU, virtio-fs libkrun)
#   SMOL_9P=1  load the 9p modules only: the agent mounts shares when the kernel is claimed
# Under libkrun this runs as PID 1 from a per-VM virtio-fs boot dir (env SMOL_LIBKRUN=1,
# SMOL_PROBE=1 for the probe); the kernel has every driver built in, so the modules.* lists
# are empty, and the root is entered with chroot (switch_root needs an initramfs root).
/bin/busybox mkdir -p /proc /sys /dev /ro /rw /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
say() { echo "smol-init: $*" > /dev/console; }
fail() {
    say "FATAL: $*"
    /bin/busybox sync
    /bin/busybox reboot -f
}

if [ "${SMOL_PROBE:-0}" = 1 ] || /bin/busybox grep -q 'smol.probe=1' /proc/cmdline; then
    say "SMOL-PROBE-OK"
    /bin/busybox poweroff -f
    /bin/busybox reboot -f
fi

load_modules() {  # $1: a list of .ko names in load order (empty under libkrun)
    while read -r mod; do
        [ -n "$mod" ] || continue
        /bin/busybox insmod "/lib/modules/$mod" || fail "insmod $mod"
    done < "$1"
}
load_modules /modules.order
[ -n "${SMOL_NET:-}" ] && load_modules /modules.net
[ -n "${SMOL_SHARES:-}${SMOL_9P:-}" ] && [ "${SMOL_LIBKRUN:-0}" != 1 ] && load_modules /modules.9p

# virtio-mmio devices appear asynchronously after the driver loads.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do /bin/busybox usleep 10000; i=$((i + 1)); done
[ -b /dev/vda ] || fail "no root disk /dev/vda"
/bin/busybox mount -t ext4 -o ro /dev/vda /ro || fail "mount root image"
if [ -b /dev/vdb ]; then
    /bin/busybox mount -t ext4 -o noatime /dev/vdb /rw || fail "mount writable disk"
else
    /bin/busybox mount -t tmpfs -o size=64m tmpfs /rw
fi
/bin/busybox mkdir -p /rw/upper /rw/work
/bin/busybox mount -t overlay overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || fail "mount overlay"

if [ -n "${SMOL_NET:-}" ]; then
    addr=${SMOL_NET%%,*}; rest=${SMOL_NET#*,}; gw=${rest%%,*}; dns=${rest#*,}
    i=0
    while ! /bin/busybox grep -q 'eth0:' /proc/net/dev && [ $i -lt 200 ]; do
        /bin/busybox usleep 10000; i=$((i + 1))
    done
    /bin/busybox ip link set eth0 up || fail "no network device eth0"
    /bin/busybox ip addr add "$addr" dev eth0 || fail "set address $addr"
    /bin/busybox ip route add default via "$gw" || fail "set default route via $gw"
    /bin/busybox rm -f /newroot/etc/resolv.conf
    for server in $(echo "$dns" | /bin/busybox tr , ' '); do
        echo "nameserver $server" >> /newroot/etc/resolv.conf
    done
fi

if [ -n "${SMOL_SHARES:-}" ]; then
    if [ "${SMOL_LIBKRUN:-0}" = 1 ]; then
        fstype=virtiofs; opts=""
    else
        fstype=9p; opts=",trans=virtio,version=9p2000.L,msize=262144,cache=mmap"
    fi
    for share in $(echo "$SMOL_SHARES" | /bin/busybox tr , ' '); do
        tag=${share%%:*}; rest=${share#*:}; path=${rest%:*}; mode=${rest##*:}
        /bin/busybox mkdir -p "/newroot$path" || fail "create share mount point $path"
        /bin/busybox mount -t "$fstype" -o "$mode$opts" "$tag" "/newroot$path" \
            || fail "mount share $tag on $path"
    done
fi

/bin/busybox umount /proc
/bin/busybox umount /dev
AGENT="/usr/bin/python3 -E -s -S @GUEST_AGENT_DIR@/agent.py"
if [ "${SMOL_LIBKRUN:-0}" = 1 ]; then
    exec /bin/busybox chroot /newroot $AGENT
fi
exec /bin/busybox switch_root /newroot $AGENT
