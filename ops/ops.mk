# TPU VM lifecycle and A/B comparison targets; included by the Makefile (which defines BIN and STAMP).
# Every target is a thin wrapper over a script in ops/ (run it with --help for details). Examples:
#   make tpu-create TPU_NAME=sid-v6e ZONES=us-east5-b,us-east1-d          # spot v6e-8, first zone with capacity
#   make tpu-bootstrap tpu-sync-env TPU_NAME=sid-v6e
#   make tpu-ssh TPU_NAME=sid-v6e WORKER=all ENV_FILE=.env CMD='.venv/bin/python -m sid.train --config ...'
#   make tpu-ssh TPU_NAME=sid-v6e AS_ROOT=1 CMD='ls'                       # as root, in /root/sid
#   make compare A=main B=HEAD TRAIN_CONFIG=configs/train/cpu/smoke.yaml EVAL_CONFIG=configs/eval/cpu/smoke.yaml
#   make tpu-create compare WHERE=tpu TPU_NAME=sid-v6e ZONES=... A=... B=... TRAIN_CONFIG=... EVAL_CONFIG=...
#   make tpu-delete TPU_NAME=sid-v6e
# DRY_RUN=1 prints the commands of every target (the gcloud commands of the tpu-* targets; the worktree, train,
# eval and report commands of compare) instead of running them; ASYNC=1 makes tpu-create and tpu-delete return
# once requested; QUIET=1 deletes without asking; ON_DEMAND=1 creates on-demand, not spot; AS_ROOT=1 runs
# tpu-ssh's command as root (in /root/sid).

OPS := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))

TPU_NAME ?=
ZONES ?=
ZONE ?=
TYPE ?= v6e-8
PROJECT ?=
ON_DEMAND ?=
REF ?=
REPO ?=
CMD ?=
WORKER ?= 0
ENV_FILE ?=
AS_ROOT ?=
A ?=
B ?=
TRAIN_CONFIG ?=
EVAL_CONFIG ?=
TRAIN_CONFIG_B ?=
EVAL_CONFIG_B ?=
WHERE ?= local
DRY_RUN ?=
ASYNC ?=
QUIET ?=

# $(call shq,TEXT): TEXT as one single-quoted shell word, whatever quotes it contains.
shq = '$(subst ','\'',$(1))'
# $(call opt,--flag,VALUE): "--flag 'VALUE'" when VALUE is set, else nothing.
opt = $(if $(strip $(2)),$(1) $(call shq,$(2)))
TPU_ARGS = $(call opt,--name,$(TPU_NAME)) $(call opt,--zone,$(ZONE)) $(call opt,--project,$(PROJECT)) \
	$(if $(DRY_RUN),--dry-run)

.PHONY: tpu-create tpu-bootstrap tpu-sync-env tpu-ssh tpu-delete compare

tpu-create:
	$(OPS)/tpu_create.sh $(call opt,--name,$(TPU_NAME)) $(call opt,--zones,$(or $(ZONES),$(ZONE))) \
		--type $(call shq,$(TYPE)) $(call opt,--project,$(PROJECT)) $(if $(ON_DEMAND),--on-demand) \
		$(if $(ASYNC),--async) $(if $(DRY_RUN),--dry-run)

tpu-bootstrap:
	$(OPS)/tpu_bootstrap.sh $(TPU_ARGS) $(call opt,--ref,$(REF)) $(call opt,--repo,$(REPO))

tpu-sync-env:
	$(OPS)/tpu_sync_env.sh $(TPU_ARGS)

tpu-ssh:
	$(OPS)/tpu_ssh.sh $(TPU_ARGS) --worker $(call shq,$(WORKER)) $(call opt,--env-file,$(ENV_FILE)) \
		$(if $(AS_ROOT),--root) $(if $(strip $(value CMD)),-- $(call shq,$(value CMD)))

tpu-delete:
	$(OPS)/tpu_delete.sh $(TPU_ARGS) $(if $(QUIET),--quiet) $(if $(ASYNC),--async)

compare: $(STAMP)
	SID_PYTHON=$(call shq,$(abspath $(BIN)/python)) $(OPS)/compare.sh $(call opt,--a,$(A)) $(call opt,--b,$(B)) \
		$(call opt,--train-config,$(TRAIN_CONFIG)) $(call opt,--eval-config,$(EVAL_CONFIG)) \
		$(call opt,--train-config-b,$(TRAIN_CONFIG_B)) $(call opt,--eval-config-b,$(EVAL_CONFIG_B)) \
		--where $(call shq,$(WHERE)) $(if $(filter tpu,$(WHERE)),$(call opt,--name,$(TPU_NAME)) \
		$(call opt,--zone,$(ZONE)) $(call opt,--project,$(PROJECT))) $(if $(DRY_RUN),--dry-run)
