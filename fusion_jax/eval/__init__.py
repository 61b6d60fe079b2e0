"""Generation and evaluation for every model the project makes (plain and fused): the decoding engine
(:mod:`.generation`), the program sandbox (:mod:`.sandbox`), math answers and tool use (:mod:`.answers`)
and code pass@k (:mod:`.code`)."""
