#!/usr/bin/env bash
# `make deb-check`: unpacks each package built by `make deb` into a scratch
# root (dpkg -x), checks what it holds, and runs its binary's check-config
# on the shipped example configuration: as shipped (it must fail only on
# the link key, which a package cannot ship) and with a key made for the
# test and the paths moved into the scratch root (it must pass).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=/var/tmp/weir-target}"
debs="$CARGO_TARGET_DIR/debian"
scratch="$(mktemp -d /tmp/weir-deb-check.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
passed=0; failed=0
check() { if eval "$2"; then echo "ok: $1"; passed=$((passed + 1)); else echo "FAILED: $1"; failed=$((failed + 1)); fi; }

for side in sender receiver; do
  deb="$(ls -t "$debs"/weir-${side}_*.deb 2>/dev/null | head -1)"
  [ -n "$deb" ] || { echo "no weir-$side package in $debs: run make deb first"; exit 1; }
  root="$scratch/$side"
  dpkg -x "$deb" "$root"
  echo "== $(basename "$deb")"
  check "$side: binary" "[ -x '$root/usr/bin/weir-$side' ]"
  check "$side: unit" "[ -f '$root/lib/systemd/system/weir-$side.service' ] || [ -f '$root/usr/lib/systemd/system/weir-$side.service' ]"
  check "$side: example configuration" "[ -f '$root/etc/weir/$side.toml' ]"
  check "$side: docs" "[ -f '$root/usr/share/doc/weir-$side/docs/audit.md' ]"
  if [ "$side" = receiver ]; then
    check "receiver: sysctl.d lets the socket have the default recv_buffer (64 MiB)" \
      "grep -qx 'net.core.rmem_max = 67108864' '$root/usr/lib/sysctl.d/60-weir-receiver.conf'"
  fi
  ctl="$scratch/$side-control"; dpkg -e "$deb" "$ctl"
  check "$side: postinst creates the weir-$side user" "grep -q 'adduser --system --group' '$ctl/postinst' && grep -q 'weir-$side' '$ctl/postinst'"
  check "$side: conffile" "grep -qx '/etc/weir/$side.toml' '$ctl/conffiles'"
  out="$("$root/usr/bin/weir-$side" check-config --config "$root/etc/weir/$side.toml" 2>&1 || true)"
  check "$side: the shipped example is valid up to its link key" "grep -q 'link.key' <<<\"\$out\" && grep -q 'auth.key_file' <<<\"\$out\""
  mkdir -p "$root/etc/weir"
  # One key for both sides, as on a real link (the sender package comes first).
  if [ "$side" = sender ]; then
    "$root/usr/bin/weir-sender" keygen --out "$root/etc/weir/link.key" >/dev/null
  else
    install -m 0600 "$scratch/sender/etc/weir/link.key" "$root/etc/weir/link.key"
  fi
  sed -e "s#\"/etc/weir/#\"$root/etc/weir/#g" -e "s#\"/var/#\"$root/var/#g" "$root/etc/weir/$side.toml" > "$root/etc/weir/$side.local.toml"
  out="$("$root/usr/bin/weir-$side" check-config --config "$root/etc/weir/$side.local.toml" 2>&1)" && ok=1 || ok=0
  check "$side: check-config passes on the shipped example with a key" "[ $ok = 1 ] && grep -q 'configuration is valid' <<<\"\$out\""
  [ $ok = 1 ] || echo "$out"
done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
