"""Device profiles shipped with lepton-edge: YAML data, read through lepton_edge.profiles."""
