"""The CPU demo's inputs, outside the library and never installed: what a real run downloads
(a VQA corpus, a pretrained SigLIP), generated instead (launch/demo.sh).

    data.py      the synthetic, learnable VQA corpus of the demo and the tests (tools/make_demo_data.py)
    encoder.py   a SigLIP in HF format with informative features built in (tools/make_demo_encoder.py)
"""
