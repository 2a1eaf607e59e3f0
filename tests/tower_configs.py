"""Small configs of every tower on the tiny synthetic job (``load_config("tiny", SMALL[name])``),
shared by the model tests."""

SMALL = {
    "dlrm": ["model.tower=dlrm"],
    "kunlun": [
        "model.tower=kunlun",
        "model.kunlun.dim=16",
        "model.kunlun.kv_rank=16",
        "model.kunlun.pffn_kv_len=8",
        "model.kunlun.wukong_mlp=32",
        "model.kunlun.head_mlp=[32]",
        "model.kunlun.default_event.dim=16",
        "model.kunlun.default_event.num_seeds=8",
        "model.kunlun.default_event.num_tokens=4",
    ],
    "dcnv2": ["model.tower=dcnv2", "model.dcnv2.num_cross_layers=2", "model.dcnv2.deep_mlp=[32,16]"],
    "dcnv2_lowrank": ["model.tower=dcnv2", "model.dcnv2.num_cross_layers=2", "model.dcnv2.low_rank=8", "model.dcnv2.deep_mlp=[32]"],
    "wukong": [
        "model.tower=wukong",
        "model.wukong.dim=16",
        "model.wukong.fm_rank=4",
        "model.wukong.mlp_hidden=32",
        "model.wukong.head_mlp=[32]",
    ],
    "hstu": ["model.tower=hstu", "model.hstu.dim=16", "model.hstu.num_summary_tokens=2", "model.hstu.head_mlp=[32]"],
    "interformer": [
        "model.tower=interformer",
        "model.interformer.dim=16",
        "model.interformer.num_summary_tokens=2",
        "model.interformer.head_mlp=[32]",
    ],
}
