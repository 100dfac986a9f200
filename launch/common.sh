#!/usr/bin/env bash
# Shared checks for the launch scripts: one clear line naming what is missing, exit 2.
die() { echo "error: $*" >&2; exit 2; }
need_cmd() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH ($2)"; }
need_var() { [[ -n "${!1:-}" ]] || die "environment variable $1 is not set ($2)"; }
need_file() { [[ -f "$1" ]] || die "file not found: $1 ($2)"; }
# Training arguments default to the tiny CPU job; pass your own after the script name.
default_train_args=(--model tiny --deepspeed_config configs/ds_tiny_adadiagpp_zero2.json)
