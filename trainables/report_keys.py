"""The names the PIR-AT worker and the orchestrator share (checkpoint file, selection and ranking metrics), in a
module without torch so that the driver-side processes (Tune trial, Train controller) need not import it."""

CHECKPOINT_FILE = "state.pt"
PROXY_METRIC = "select_robust_miou"
# Checkpoints are ranked by this key: the robust proxy after a validation, else -1 (never preferred). It is
# always finite: Ray Train's JSON snapshot of its checkpoint list turns NaN or inf into null, which a
# restored run cannot rank.
RANK_METRIC = "checkpoint_rank"
