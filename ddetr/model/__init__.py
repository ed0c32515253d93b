"""The network: backbone, position encoding, encoder, decoder, deformable attention, heads, the two models."""
