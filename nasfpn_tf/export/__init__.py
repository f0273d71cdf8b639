"""Exports of trained model dirs for serving: SavedModel (TF Serving) and TFLite."""
