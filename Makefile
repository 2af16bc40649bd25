.PHONY: compile trace test bench clean

compile:
	pip install -e .

trace:
	FASTWS_TRACE=1 pip install -e .

test: compile
	python -m pytest

bench: compile
	python -m bench

clean:
	rm -rf build fastws/*.c fastws/*.so fastws/*.html *.egg-info
