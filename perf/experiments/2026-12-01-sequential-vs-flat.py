"""Block-by-block calibration against layer by layer from the dense inputs: GPTQ on
all-MiniLM-L6-v2 (the model and sentences of perf/one_shot_bert.py; run `make one-shot-bert`
once to install the model). Output: the .txt beside this file."""

import copy
import time

import torch

import compress_ops as co
from compress_ops.perf import one_shot_bert as ob

torch.set_num_threads(2)
model, tok = ob.load_minilm()
sents = ob.corpus()
calib = ob.tokenize(tok, sents[:128], 16)
held = ob.tokenize(tok, sents[128:384], 32)
ref = ob.embed(model, held)
for bits, gs in ((4, 128), (3, 128), (2, 64)):
    for seq in (True, False):
        m = copy.deepcopy(model)
        t = time.perf_counter()
        co.compress_(m, co.QuantConfig(bits=bits, group_size=gs, method="gptq"), calib=calib,
                     forward=ob.forward, sequential=seq, progress=False)
        dt = time.perf_counter() - t
        cos = float((ob.embed(m, held) * ref).sum(1).mean())
        print(f"int{bits} g{gs} GPTQ sequential={seq}: cosine {cos:.4f}  ({dt:.1f} s)",
              flush=True)
