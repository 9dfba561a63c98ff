"""What runs leave on disk, torch-free: the checkpoint registry (`registry`; its `entry`, `files`, `lineage` and
`removal`), run folders (`runs`), the lock that makes one process run a run (`runlock`), the sealed record of what a
run started with (`start_record`), what a run folder's config may run as code on resume (`trust`), and files written
whole (`fileio`)."""
