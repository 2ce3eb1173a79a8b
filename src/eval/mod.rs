//! Sample quality: a small MNIST classifier, Frechet distance in its feature space, class accuracy.
