"""What a pathologist looks at: the review queue, a patient, a slide zoomed in.

What it holds: :mod:`.patients` (the review queue, a patient's record, top and
bottom patches, Grad-CAM), :mod:`.attention_view` (how patch scores are
coloured, with the scale said), :mod:`.overlays` (the viewer's layers, and the
same as GeoJSON for QuPath) and :mod:`.deepzoom` (Deep Zoom tiles with a disk
cache).

What it may import: everything below it, up to :mod:`cmil_core.outputs`.
"""
