"""The fast-path floor: a Verlet neighbour list on the device, the persistent-state engine with CUDA graphs, element-restricted skip connections and whole-call compilation."""
