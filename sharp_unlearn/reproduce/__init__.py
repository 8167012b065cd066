"""Reproductions of the paper's claims: the theory experiment and the empirical table."""
