"""Generation and evaluation for every model the project makes (plain and fused): held-out response loss
in fixed-shape batches (:mod:`.loss`), the decoding engine (:mod:`.generation`), the program sandbox
(:mod:`.sandbox`), math answers and tool use (:mod:`.answers`) and code pass@k (:mod:`.code`)."""
