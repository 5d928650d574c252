"""A do-nothing KV connector that records what vLLM hands to a connector.

Load with
  kv_transfer_config={"kv_connector": "RecordingConnector",
                      "kv_connector_module_path": "recording_connector",
                      "kv_role": "kv_both",
                      "kv_connector_extra_config": {"log": "/tmp/rec.jsonl"}}
(the module must be importable; vllm_harness puts this directory on PYTHONPATH).
Every call is appended as one JSON line to extra_config["log"] (default
/tmp/recording_connector.jsonl), tagged with role and pid.
"""
import json
import os
from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole)


@dataclass
class RecMeta(KVConnectorMetadata):
    step: int


class RecordingConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._log = extra.get("log", "/tmp/recording_connector.jsonl")
        self._step = 0
        self._saved_layers = 0
        self._w("init", role=str(role), extra=extra,
                block_size=vllm_config.cache_config.block_size,
                kv_cache_config=repr(kv_cache_config)[:1500])

    def _w(self, ev, **kw):
        kw.update(ev=ev, pid=os.getpid(), role=self.role.name)
        with open(self._log, "a") as f:
            f.write(json.dumps(kw, default=str) + "\n")

    # ------------------------------------------------------------ worker
    def register_kv_caches(self, kv_caches):
        info = {}
        ptrs = []
        for name, t in kv_caches.items():
            info[name] = dict(shape=list(t.shape), stride=list(t.stride()),
                              dtype=str(t.dtype), device=str(t.device),
                              contiguous=t.is_contiguous(),
                              is_view=t._base is not None,
                              storage_offset=t.storage_offset(),
                              data_ptr=t.data_ptr(),
                              storage_nbytes=t.untyped_storage().nbytes(),
                              base_shape=(list(t._base.shape)
                                          if t._base is not None else None),
                              type=type(t).__name__)
            ptrs.append(t.data_ptr())
        self._w("register_kv_caches", layers=info,
                same_storage=len({t.untyped_storage().data_ptr()
                                  for t in kv_caches.values()}) == 1)

    def start_load_kv(self, forward_context, **kwargs):
        m = self._get_connector_metadata()
        am = getattr(forward_context, "attn_metadata", None)
        self._w("start_load_kv", step=m.step, kwargs=list(kwargs),
                attn_metadata_type=type(am).__name__,
                attn_keys=(list(am.keys()) if isinstance(am, dict) else None))
        self._saved_layers = 0

    def wait_for_layer_load(self, layer_name):
        pass

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        if self._saved_layers == 0:
            sm = getattr(attn_metadata, "slot_mapping", None)
            self._w("save_kv_layer", layer=layer_name,
                    kv_shape=list(kv_layer.shape), kv_stride=list(kv_layer.stride()),
                    md_type=type(attn_metadata).__name__,
                    slot_mapping_len=(int(sm.numel()) if sm is not None else None),
                    slot_mapping_head=(sm[:4].tolist() if sm is not None else None),
                    num_actual_tokens=getattr(attn_metadata, "num_actual_tokens", None),
                    kwargs=list(kwargs))
        self._saved_layers += 1

    def wait_for_save(self):
        self._w("wait_for_save", layers_saved=self._saved_layers)

    def get_finished(self, finished_req_ids):
        if finished_req_ids:
            self._w("get_finished", finished_req_ids=sorted(finished_req_ids))
        return None, None

    # --------------------------------------------------------- scheduler
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        self._w("get_num_new_matched_tokens", req=request.request_id,
                num_computed_tokens=num_computed_tokens,
                num_prompt_tokens=request.num_prompt_tokens,
                num_tokens=request.num_tokens,
                req_num_computed_tokens=request.num_computed_tokens,
                status=str(request.status))
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self._w("update_state_after_alloc", req=request.request_id,
                block_ids=[list(g) for g in blocks.get_block_ids()],
                num_external_tokens=num_external_tokens)

    def build_connector_meta(self, so):
        cr = so.scheduled_cached_reqs
        self._w("build_connector_meta", step=self._step,
                new=[dict(req=r.req_id, prompt_len=len(r.prompt_token_ids or []),
                          block_ids=[list(g) for g in r.block_ids],
                          num_computed_tokens=r.num_computed_tokens)
                     for r in so.scheduled_new_reqs],
                cached=dict(req_ids=cr.req_ids,
                            resumed=sorted(cr.resumed_req_ids),
                            new_block_ids=[None if b is None else [list(g) for g in b]
                                           for b in cr.new_block_ids],
                            num_computed_tokens=cr.num_computed_tokens,
                            num_output_tokens=cr.num_output_tokens,
                            new_token_ids_lens=[len(x) for x in cr.new_token_ids],
                            all_token_ids_lens={k: len(v) for k, v in
                                                cr.all_token_ids.items()}),
                num_scheduled_tokens=so.num_scheduled_tokens,
                finished_req_ids=sorted(so.finished_req_ids),
                preempted_req_ids=sorted(so.preempted_req_ids or []),
                new_block_ids_to_zero=so.new_block_ids_to_zero)
        m = RecMeta(step=self._step)
        self._step += 1
        return m

    def request_finished(self, request, block_ids):
        self._w("request_finished", req=request.request_id,
                block_ids=list(block_ids),
                num_computed_tokens=request.num_computed_tokens,
                num_tokens=request.num_tokens, status=str(request.status))
        return False, None
