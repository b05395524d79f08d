"""The math core: plain, vectorised functions on tensors, with no model and no Lightning. Visual entropy,
confidence and difficulty groups (:mod:`.difficulty`), the advantage estimators (:mod:`.advantages`), the policy loss
(:mod:`.losses`) and the verifiable rewards (:mod:`.rewards`)."""
