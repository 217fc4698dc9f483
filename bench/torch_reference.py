"""PyTorch step with the reference's structure, timed side by side with the JAX step (optional).

Not the reference itself (its code is not in this repository): the same maths and the same
control flow as the reference's training step: a Python loop over the pool for client forward
(with the per-parameter EMA loop and a no-grad target forward), one server `compute` with the
original symmetric loss (W(Aq), W'(Ak), W(Ak), W'(Aq)) against a K x 1024 queue, server SGD,
then a Python loop of per-client `backward(grad)` + SGD + scheduler steps, zero_grad over all N
optimizers and FedAvg at sync steps. ResNet-18 GroupNorm + WS convs, V2 head, NCHW (PyTorch's default), CPU.
It gives a reference-shaped figure measured under the same machine load as our benchmarks.

Needs torch (not a project dependency); run it with an interpreter that has it:

  python bench/torch_reference.py --clients 100 --cut 2 --threads 2 --steps 5
"""
import argparse
import copy
import json
import os
import pathlib
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class WSConv2d(nn.Conv2d):
  def forward(self, x):
    w = self.weight
    w = w - w.mean(dim=(1, 2, 3), keepdim=True)
    w = w / (w.view(w.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
    return F.conv2d(x, w, self.bias, self.stride, self.padding)


def gn(c):
  return nn.GroupNorm(max(c // 4, 1), c)


class Block(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.c1 = WSConv2d(cin, cout, 3, stride, 1, bias=False)
    self.n1 = gn(cout)
    self.c2 = WSConv2d(cout, cout, 3, 1, 1, bias=False)
    self.n2 = gn(cout)
    self.sc = None
    if stride != 1 or cin != cout:
      self.sc = nn.Sequential(WSConv2d(cin, cout, 1, stride, 0, bias=False), gn(cout))

  def forward(self, x):
    out = self.n2(self.c2(F.relu(self.n1(self.c1(x)))))
    return F.relu(out + (x if self.sc is None else self.sc(x)))


def resnet18_layers(width=64):
  layers = [nn.Sequential(WSConv2d(3, width, 3, 1, 1, bias=False), gn(width), nn.ReLU())]
  cin = width
  for stage in range(4):
    cout = width * 2 ** stage
    for b in range(2):
      layers.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1))
      cin = cout
  return layers, cin


class Server(nn.Module):
  def __init__(self, layers, feat):
    super().__init__()
    self.body = nn.Sequential(*layers)
    self.head = nn.Sequential(nn.Linear(feat, 1024), nn.ReLU(), nn.Linear(1024, 1024))

  def forward(self, x):
    return self.head(F.adaptive_avg_pool2d(self.body(x), 1).flatten(1))


def info_nce(q, k, queue, t=0.1):
  l_pos = (q * k).sum(1, keepdim=True)
  l_neg = q @ queue.clone().detach()   # as MoCo: the enqueue below must not touch the graph
  logits = torch.cat([l_pos, l_neg], 1) / t
  return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


def build(args):
  torch.manual_seed(0)
  layers, feat = resnet18_layers()
  client0 = nn.Sequential(*layers[:args.cut])
  server = Server(layers[args.cut:], feat)
  clients = [copy.deepcopy(client0) for _ in range(args.clients)]
  targets = [copy.deepcopy(c) for c in clients]
  for t in targets:
    for p in t.parameters():
      p.requires_grad = False
  c_opts = [torch.optim.SGD(c.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
            for c in clients]
  c_scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, 200) for o in c_opts]
  s_target = copy.deepcopy(server)
  for p in s_target.parameters():
    p.requires_grad = False
  s_opt = torch.optim.SGD(server.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
  queue = F.normalize(torch.randn(1024, args.queue), dim=0)
  return clients, targets, c_opts, c_scheds, server, s_target, s_opt, queue


def step(args, state, pool, data, sync):
  clients, targets, c_opts, c_scheds, server, s_target, s_opt, queue = state
  s_opt.zero_grad()
  for o in c_opts:                                    # the reference zeroes all N optimizers
    o.zero_grad()
  outs, a_q, a_k = [], [], []
  t0 = time.perf_counter()
  for j, c in enumerate(pool):
    xq, xk = data[j]
    out = clients[c](xq)
    with torch.no_grad():
      for pt, po in zip(targets[c].parameters(), clients[c].parameters()):
        pt.data = pt.data * 0.99 + po.data * 0.01
      a_k.append(targets[c](xk))
    outs.append(out)
    a_q.append(out.detach())
  t_fwd = time.perf_counter() - t0
  a_q = torch.cat(a_q).requires_grad_(True)
  a_k = torch.cat(a_k)
  with torch.no_grad():
    for pt, po in zip(s_target.parameters(), server.parameters()):
      pt.data = pt.data * 0.99 + po.data * 0.01
  q1 = F.normalize(server(a_q), dim=1)
  with torch.no_grad():
    k2 = F.normalize(s_target(a_k), dim=1)
  q2 = F.normalize(server(a_k), dim=1)
  with torch.no_grad():
    k1 = F.normalize(s_target(a_q), dim=1)
  loss = info_nce(q1, k2, queue) + info_nce(q2, k1, queue)
  keys = torch.cat([k1, k2])
  ptr = state_ptr[0]
  idx = (torch.arange(len(keys)) + ptr) % queue.shape[1]
  queue[:, idx] = keys.T
  state_ptr[0] = (ptr + len(keys)) % queue.shape[1]
  loss.backward()
  s_opt.step()
  grads = a_q.grad.split(args.batch)
  t1 = time.perf_counter()
  for j, c in enumerate(pool):
    outs[j].backward(grads[j])
    c_opts[c].step()
    c_scheds[c].step()
  CLIENT_SECONDS.append(t_fwd + time.perf_counter() - t1)   # the per-client loops (fwd, bwd)
  if sync:
    sd = [clients[c].state_dict() for c in pool]
    avg = {k: sum(s[k] for s in sd) / len(sd) for k in sd[0]}
    for c in clients:
      c.load_state_dict(avg)
  return float(loss)


state_ptr = [0]
CLIENT_SECONDS = []


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--clients', type=int, default=100)
  parser.add_argument('--pool', type=int, default=0, help='0: all clients')
  parser.add_argument('--cut', type=int, default=2)
  parser.add_argument('--images', type=int, default=100, help='images per step (P * B)')
  parser.add_argument('--queue', type=int, default=6000)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  pool_size = args.pool or args.clients
  args.batch = max(args.images // pool_size, 1)
  state = build(args)
  g = torch.Generator().manual_seed(1)
  pool = list(range(pool_size))
  times, losses, client_s = [], [], []
  for s in range(args.warmup + args.steps):
    data = [(torch.randn(args.batch, 3, 32, 32, generator=g),
             torch.randn(args.batch, 3, 32, 32, generator=g)) for _ in pool]
    t0 = time.perf_counter()
    losses.append(step(args, state, pool, data, sync=False))
    if s >= args.warmup:
      times.append(time.perf_counter() - t0)
      client_s.append(CLIENT_SECONDS[-1])
  med = statistics.median(times)
  res = dict(benchmark='torch_reference_step', clients=args.clients, pool=pool_size,
             batch=args.batch, cut=args.cut, threads=args.threads, queue=args.queue,
             median_s=med, times_s=times, client_loop_median_s=statistics.median(client_s),
             steps_per_s=1 / med, images_per_s=pool_size * args.batch / med,
             torch=torch.__version__, load_avg=os.getloadavg(), cpu_count=os.cpu_count(),
             platform=platform.platform(),
             time_utc=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
  print(json.dumps(res))
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, 'a') as f:
      f.write(json.dumps(res) + '\n')


if __name__ == '__main__':
  main()
