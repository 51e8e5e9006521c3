"""Worker processes and collectives (torchrun launcher, job channel, parallel strategies).

``launcher``   WorkerPool / PoolOptions / shared_pool: warm torchrun workers + job channel
``sampler``    DistributedSampler: StreamingSampler's interface over a pool
``worker``     the file torchrun runs (bootstraps the pack under its fixed name)
``agent``      the other machines of a multi-machine pool (``python -m liveavatar worker-agent``)
``runtime``    what a rank does: model build, tpp and sp rank loops
``ulysses``    sp: sequence split over ranks, all-to-all around attention (why not ring attention)
``sharding``   FSDP2 weight shards of the sp layouts (next block's all-gather prefetched)
``protocol``   length-prefixed, pickle-free channel messages (auth frame first, bounded, never inflated)
``handshake``  the head authenticating new channel connections concurrently, ~1 s each
``torchrun``   torchrun's entry with the stores it hosts bound to one address (loopback on one machine)

Importing this package pulls in nothing; import the modules you need.
"""
