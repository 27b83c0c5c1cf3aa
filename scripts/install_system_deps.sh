#!/usr/bin/env bash
# System packages fedhubert needs: sox and libsox (torchaudio's sox backend, used by S3PRL's speech_commands),
# espeak-ng (speaks the built-in corpora), openssl and ssh-keygen (certificates and keys for Flower's deployment
# engine, scripts/make_certificates.sh). With WITH_SLURM=1 also slurm-wlm and munge, for the tests that run the
# batch scripts on a private one-node Slurm cluster (CI sets it). Installs them with apt where it can; elsewhere
# (an HPC login node, a non-Debian system) it prints exactly what to install and stops.
set -euo pipefail

missing=()
command -v sox >/dev/null 2>&1 || missing+=(sox)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
# torchaudio 2.8 opens the unversioned libsox.so, which Debian ships in libsox-dev.
{ /sbin/ldconfig -p 2>/dev/null || ldconfig -p 2>/dev/null; } | grep -q 'libsox\.so ' || missing+=(libsox-dev)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
if [ "${WITH_SLURM:-0}" = 1 ]; then
  for tool in slurmctld slurmd sbatch; do
    command -v $tool >/dev/null 2>&1 || [ -x /usr/sbin/$tool ] || { missing+=(slurm-wlm); break; }
  done
  command -v munged >/dev/null 2>&1 || [ -x /usr/sbin/munged ] || missing+=(munge)
fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: sox, libsox, espeak-ng, openssl, ssh-keygen$([ "${WITH_SLURM:-0}" = 1 ] && echo ", slurm-wlm, munge") found"
  exit 0
fi

if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo"; else sudo="none"; fi
  if [ "$sudo" != "none" ]; then
    echo "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    # Installing slurm-wlm on a machine with systemd may start its services with the default (empty) config;
    # the tests start their own daemons with their own config and do not use those.
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    exit 0
  fi
  echo "error: missing system packages: ${missing[*]}; install them with:" >&2
  echo "  sudo apt-get install ${missing[*]}" >&2
  exit 1
fi

cat >&2 <<MSG
error: missing system packages: ${missing[*]} (and apt-get is not available here).
Install them in one of these ways, then run make again:
  - conda/mamba (no root needed):  conda install -c conda-forge sox espeak-ng openssl openssh
      (conda's sox package ships libsox; make sure \$CONDA_PREFIX/lib is on LD_LIBRARY_PATH)
  - a cluster's modules:           module spider sox; module spider espeak-ng; module load ...
  - Fedora/RHEL/Rocky (root):      dnf install sox sox-devel espeak-ng openssl openssh-clients
Or skip this check with SKIP_SYSTEM_DEPS=1 (synthetic corpora and S3PRL's speech_commands then fail). See setup.md.
MSG
exit 1
