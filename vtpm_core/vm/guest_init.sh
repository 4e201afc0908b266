#!/bin/busybox sh
# vtpm-trust attestation guest: /init of the initramfs (busybox sh + tpm2-tools).
#
# At boot it mounts proc/sys/dev/securityfs, loads the virtio/fw_cfg modules,
# waits for /dev/tpmrm0, creates the TCG default RSA EK and an RSA AK
# (sha256, rsassa, restricted signing), then serves the host over the second
# serial port /dev/ttyS1 (a unix-socket chardev on the host side).
#
# Wire protocol, version 1 (host side: vtpm_core/vm/channel.py). One line per
# message, "\n"-terminated, fields separated by one space, binary fields in
# base64 without line breaks, "-" for an absent field:
#   guest: VTPM-GUEST 1 READY           repeated every second until the first command
#   host:  HELLO
#   guest: OK HELLO <ekcert_rsa> <ekcert_ecc> <ek_pub> <ak_pub> <ak_name>
#   host:  ACTIVATE <credential blob, tpm2_makecredential format>
#   guest: OK ACTIVATE <secret>
#   host:  QUOTE <nonce> <pcr selection, e.g. sha256:0,1,2>
#   guest: OK QUOTE <TPMS_ATTEST> <TPMT_SIGNATURE> <tpm2-tools pcrs file> <event log>
#   host:  IMA <byte offset> <max bytes>
#   guest: OK IMA <list bytes> <binary_runtime_measurements from the offset, at most max bytes>
#   host:  EXECCOPY <name: [a-z0-9-], 1-32 characters>
#   guest: OK EXECCOPY <path> <exit status>  ran a copy of busybox with the name appended
#   host:  POWEROFF
#   guest: OK POWEROFF                    then the VM powers off
# Any failure: "ERR <COMMAND> <one-line message>", and the guest keeps serving.
#
# IMA: with "vtpm.ima=1" on the kernel command line, the policy below is
# loaded before anything else runs, so the kernel measures into PCR 10 every
# program executed, every file mapped executable and every kernel module
# loaded from then on. The initramfs root is tmpfs, which the built-in tcb
# policy skips: this policy has no fsmagic exclusions.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
mount -t tmpfs tmpfs /tmp

IMA_DIR=/sys/kernel/security/ima
IMA=off
read -r CMDLINE < /proc/cmdline
case " $CMDLINE " in
  *" vtpm.ima=1 "*)
    # one write: this kernel has no CONFIG_IMA_WRITE_POLICY, so the policy is set once
    if printf '%s\n' \
      "measure func=BPRM_CHECK template=ima-sig" \
      "measure func=FILE_MMAP mask=MAY_EXEC template=ima-sig" \
      "measure func=MODULE_CHECK template=ima-sig" > $IMA_DIR/policy; then
      IMA=on
    else
      IMA="policy refused"
    fi
    ;;
esac

log() { echo "VTPM-GUEST: $* uptime=$(cut -d' ' -f1 /proc/uptime)" > /dev/console; }
log "init ima=$IMA"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci qemu_fw_cfg; do
  insmod /lib/modules/$m.ko 2>/dev/null || log "insmod $m failed"
done

W=/tmp/attest
mkdir -p $W
cd $W || exit 1
export TPM2TOOLS_TCTI=device:/dev/tpmrm0
ERRMSG=""
# run NAME CMD...: run a tool; on failure leave a one-line reason in ERRMSG
run() {
  name=$1
  shift
  if "$@" > tool.out 2> tool.err; then return 0; fi
  ERRMSG="$name failed: $(tail -n 3 tool.err | tr '\r\n\t' '   ' | cut -c1-400)"
  return 1
}

SETUP_ERR=""
i=0
while [ ! -e /dev/tpmrm0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -e /dev/tpmrm0 ]; then
  SETUP_ERR="no TPM: /dev/tpmrm0 missing"
elif ! run createek tpm2 createek -c ek.ctx -G rsa -u ek.pub; then
  SETUP_ERR=$ERRMSG
elif ! run createak tpm2 createak -C ek.ctx -c ak.ctx -G rsa -g sha256 -s rsassa -u ak.pub.pem -f pem -n ak.name; then
  SETUP_ERR=$ERRMSG
elif ! run readpublic tpm2 readpublic -c ak.ctx -o ak.pub; then
  SETUP_ERR=$ERRMSG
fi
tpm2 nvread 0x01c00002 -o ekcert_rsa.der > /dev/null 2>&1 || rm -f ekcert_rsa.der
tpm2 nvread 0x01c0000a -o ekcert_ecc.der > /dev/null 2>&1 || rm -f ekcert_ecc.der
log "tpm ready${SETUP_ERR:+ with error: $SETUP_ERR}"

b64() { if [ -s "$1" ]; then base64 -w0 "$1"; else printf -- -; fi; }

if [ ! -e /dev/ttyS1 ] || ! stty -F /dev/ttyS1 raw -echo 115200; then
  log "FATAL no /dev/ttyS1 for the host channel"
  poweroff -f
fi
exec 3<>/dev/ttyS1
say() { echo "$*" >&3; }

do_hello() {
  if [ -n "$SETUP_ERR" ]; then say "ERR HELLO $SETUP_ERR"; return; fi
  say "OK HELLO $(b64 ekcert_rsa.der) $(b64 ekcert_ecc.der) $(b64 ek.pub) $(b64 ak.pub) $(b64 ak.name)"
}

do_activate() {
  if [ -n "$SETUP_ERR" ]; then say "ERR ACTIVATE $SETUP_ERR"; return; fi
  rm -f cred.blob secret.out s.ctx
  if ! printf '%s' "$1" | base64 -d > cred.blob 2> /dev/null || [ ! -s cred.blob ]; then
    say "ERR ACTIVATE credential blob is not base64"
    return
  fi
  if run startauthsession tpm2 startauthsession --policy-session -S s.ctx \
    && run policysecret tpm2 policysecret -S s.ctx -c e \
    && run activatecredential tpm2 activatecredential -c ak.ctx -C ek.ctx -i cred.blob -o secret.out -P session:s.ctx; then
    tpm2 flushcontext s.ctx > /dev/null 2>&1
    say "OK ACTIVATE $(b64 secret.out)"
  else
    [ -e s.ctx ] && tpm2 flushcontext s.ctx > /dev/null 2>&1
    say "ERR ACTIVATE $ERRMSG"
  fi
}

do_quote() {
  if [ -n "$SETUP_ERR" ]; then say "ERR QUOTE $SETUP_ERR"; return; fi
  rm -f q.msg q.sig q.pcrs eventlog.bin
  nonce=$(printf '%s' "$1" | base64 -d 2> /dev/null | xxd -p -c 256)
  if [ -z "$nonce" ]; then say "ERR QUOTE nonce is empty or not base64"; return; fi
  case "$2" in
    "" | *[!a-z0-9:,+]*) say "ERR QUOTE bad PCR selection"; return ;;
  esac
  if ! run quote tpm2 quote -c ak.ctx -l "$2" -q "$nonce" -m q.msg -s q.sig -o q.pcrs -g sha256; then
    say "ERR QUOTE $ERRMSG"
    return
  fi
  cat /sys/kernel/security/tpm0/binary_bios_measurements > eventlog.bin 2> /dev/null
  say "OK QUOTE $(b64 q.msg) $(b64 q.sig) $(b64 q.pcrs) $(b64 eventlog.bin)"
}

do_ima() {
  case "$1:$2" in
    *[!0-9:]* | :* | *:) say "ERR IMA offset and size must be decimal numbers"; return ;;
  esac
  if [ ${#1} -gt 12 ] || [ ${#2} -gt 12 ]; then say "ERR IMA offset or size too large"; return; fi
  if [ "$IMA" != on ]; then say "ERR IMA measurement is $IMA (boot with vtpm.ima=1)"; return; fi
  rm -f ima.bin ima.part
  # one read of the whole list: the kernel gives whole entries, and the list only grows
  if ! cat $IMA_DIR/binary_runtime_measurements > ima.bin 2> tool.err; then
    say "ERR IMA cannot read binary_runtime_measurements: $(head -c 200 tool.err | tr '\r\n' '  ')"
    return
  fi
  size=$(wc -c < ima.bin)
  if [ "$1" -gt "$size" ]; then say "ERR IMA offset $1 is past the list's $size bytes"; return; fi
  tail -c +$(($1 + 1)) ima.bin | head -c "$2" > ima.part
  say "OK IMA $size $(b64 ima.part)"
}

do_execcopy() {
  case "$1" in
    "" | *[!a-z0-9-]*) say "ERR EXECCOPY name must be [a-z0-9-]"; return ;;
  esac
  if [ ${#1} -gt 32 ]; then say "ERR EXECCOPY name longer than 32 characters"; return; fi
  mkdir -p /tmp/run
  copy=/tmp/run/busybox-$1
  # a program no policy learned: busybox's bytes plus the name (busybox-* runs as busybox)
  if ! { cat /bin/busybox && echo "$1"; } > $copy || ! chmod 755 $copy; then
    say "ERR EXECCOPY cannot write $copy"
    return
  fi
  $copy true > /dev/null 2>&1
  say "OK EXECCOPY $copy $?"
}

# announce until the host speaks (it may connect after the first line went out)
line=""
while [ -z "$line" ]; do
  say "VTPM-GUEST 1 READY"
  read -r -t 1 line <&3
done
log "host connected"
set -f # fields are split below: no globbing
while :; do
  set -- $line
  cmd=$1
  case "$cmd" in
    HELLO) do_hello ;;
    ACTIVATE) do_activate "$2" ;;
    QUOTE) do_quote "$2" "$3" ;;
    IMA) do_ima "$2" "$3" ;;
    EXECCOPY) do_execcopy "$2" ;;
    POWEROFF) say "OK POWEROFF"; break ;;
    "") ;;
    *) say "ERR $(printf '%s' "$cmd" | cut -c1-32) unknown command" ;;
  esac
  line=""
  read -r line <&3 || break
done
log "POWEROFF"
exec 3>&-
sync
poweroff -f
