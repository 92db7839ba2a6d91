"""Video decoding: decord, PyAV or torchcodec, in the calling process or a guarded child process.

video_reader  `open_video`, `VideoReader`: the client side, and the choice of decoder
backends      the decoders themselves (numpy frames); no torch at module level
server        the guarded decoding process (`python -m squarefuse.datasets.decoding.server`)
protocol      the messages between a `VideoReader` and its decoding process
gpu           `dataset.decode_device=cuda`: train clips decoded with NVDEC in the training process

Importing this package imports nothing: the decoding process starts with it and must stay light.
"""
