# Shortcuts for the two README commands (the scripts work without make too).
.PHONY: demo demo-stop test lint bench
demo:
	./scripts/demo.sh
demo-stop:
	./scripts/demo.sh stop
test:
	./scripts/test.sh
lint:
	.venv/bin/ruff check .
