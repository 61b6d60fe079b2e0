"""Generation and evaluation for every model the project makes (plain and fused): the decoding engine
(:mod:`.generation`), scoring of token sequences (:mod:`.scoring`: response loss, log-likelihoods),
held-out loss on the trainer's mesh (:mod:`.loss`), the program sandbox (:mod:`.sandbox`), math answers
and tool use (:mod:`.answers`), code pass@k (:mod:`.code`), any model directory as one object
(:mod:`.models`), resumable evaluation tasks (:mod:`.tasks`), the ``generate``/``eval`` commands
(:mod:`.cli`) and the lm-evaluation-harness adapter (:mod:`.harness`)."""
