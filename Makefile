.PHONY: compile trace test bench fuzz clean

compile:
	pip install -e .

trace:
	FASTWS_TRACE=1 pip install -e .

test: compile
	python -m pytest

bench: compile
	python -m bench

# the hypothesis properties (the head parser against llhttp, both configuration readers, the
# head sent upstream, the PROXY protocol reader) with FASTWS_FUZZ times their examples: the
# default checks about a million request heads, as many responses, 4,000 configurations of
# each format, 1,500 proxied heads and 13,000 PROXY headers (about 6 minutes on 2 cores)
FASTWS_FUZZ ?= 10
fuzz: compile
	FASTWS_FUZZ=$(FASTWS_FUZZ) python -m pytest -p no:cacheprovider -q tests/test_parse.py \
		tests/test_nginx.py tests/test_config.py tests/test_http.py tests/test_proxy_protocol.py \
		-k "agree or any_text or any_table or strict_parser or any_bytes or valid_header"

clean:
	rm -rf build fastws/*.c fastws/*.so fastws/*.html *.egg-info
