"""How the policy is laid over processes: DDP replicas (the module's own gradient average) or FSDP2 shards."""
