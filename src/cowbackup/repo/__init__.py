"""The deduplicating, encrypted backup repository (format: ``docs/repository.md``).

Layers inside the package, lowest first (each imports only those above it in this list):

* :mod:`.errors`, :mod:`.cachedir` -- the error tree; where the local caches live;
* :mod:`.store`, :mod:`.store_local` -- the storage backend interface and the local-directory backend;
* :mod:`.crypto`, :mod:`.blob` -- keys, chunk ids, and the envelope every stored object is sealed in;
* :mod:`.config`, :mod:`.keys` -- the repository's config object and its wrapped master keys;
* :mod:`.index`, :mod:`.manifest` -- per-disk index segments and the snapshot manifest;
* :mod:`.manifest_cache` -- manifests already read, kept locally (checked again on every use);
* :mod:`.repository` -- an open repository: chunks, snapshots, damage records;
* :mod:`.cache`, :mod:`.sessions`, :mod:`.gc` -- the known-chunk cache, backup sessions, garbage collection;
* :mod:`.retention`, :mod:`.writer`, :mod:`.reader`, :mod:`.verify` -- what the commands do.
"""
