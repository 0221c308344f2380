#!/bin/busybox sh
# smol-kernel initramfs /init: load the few modules the guest needs, mount the read-only
# root image with a per-VM writable overlay on top, and hand PID 1 to the guest agent.
# Kernel command line knobs: smol.probe=1 (KVM probe: print a marker and power off).
# Under libkrun this runs as PID 1 from a per-VM virtio-fs boot dir (env SMOL_LIBKRUN=1,
# SMOL_PROBE=1 for the probe); the kernel has every driver built in, so modules.order is
# empty, and the root is entered with chroot (switch_root needs an initramfs root).
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

while read -r mod; do
    /bin/busybox insmod "/lib/modules/$mod" || fail "insmod $mod"
done < /modules.order

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
/bin/busybox umount /proc
/bin/busybox umount /dev
AGENT="/usr/bin/python3 -E -s -S /opt/smol-kernel/agent.py"
if [ "${SMOL_LIBKRUN:-0}" = 1 ]; then
    exec /bin/busybox chroot /newroot $AGENT
fi
exec /bin/busybox switch_root /newroot $AGENT
