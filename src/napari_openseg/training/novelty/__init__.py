"""Training a MedOpenSeg novelty model on labelled volumes."""
