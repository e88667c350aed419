"""The base every stage and trainer uses: config, storage (local or object store), the stage protocol,
Ray start-up, device placement, model loading, the lens (the model up to the hook layer), the features'
on-disk format and the answer reward."""
