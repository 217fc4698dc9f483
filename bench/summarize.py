"""Markdown table and PNG summary of bench/results/step_*.json (written by step_bench.py).

  python bench/summarize.py [results.json ...]   # default: bench/results/step_*.json

Prints the table and writes bench/results/summary.png; the README's table between the
`<!-- table -->` markers is replaced with it.
"""
import glob
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent
START, END = '<!-- table -->', '<!-- /table -->'


def rows(report):
  for s in report['settings']:
    if 'error' in s:
      continue
    r = {x['name']: x for x in s['results']}
    yield s, r


def table(reports) -> str:
  head = ('| threads | clients (pool) | B | cut | full step s | img/s | steps/s | torch-shaped ref s '
          '(same run) | speed-up | server s | clients vmap s | clients loop s | vmap/loop | '
          'torch client loops s | vmap/torch loops | sync s (% step) | augment ms | GFLOP/step | '
          'GFLOP/s | % conv peak | peak RSS GiB | '
          'compile s | recompiles | load |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for rep in reports:
    t = rep['threads']
    for s, r in rows(rep):
      st = s['setting']
      full = r.get('full_step', {})
      tr = s.get('torch_reference', {})
      def f(d, k='median_s', fmt='{:.2f}'):
        return fmt.format(d[k]) if d and d.get(k) is not None else '-'
      ref = tr.get('median_s')
      med = full.get('median_s')
      sync = r.get('sync')
      lines.append('| ' + ' | '.join([
          str(t), f"{st['clients']} ({st['pool']})" + (f", chunk {st['client_chunk']}"
                                                       if st.get('client_chunk') else ''),
          str(st['batch']), str(st['cut']),
          f(full), f(full, 'images_per_s', '{:.1f}'), f(full, 'steps_per_s', '{:.3f}'),
          f'{ref:.2f}' if ref else '-', f'{ref / med:.2f}x' if ref and med else '-',
          f(r.get('server')), f(r.get('clients_vmap'), 'median_s', '{:.3f}'),
          f(r.get('clients_loop'), 'median_s', '{:.3f}'),
          f(r.get('clients_loop'), 'speedup_vmap', '{:.1f}x'),
          f(tr, 'client_loop_median_s'),
          (f"{tr['client_loop_median_s'] / r['clients_vmap']['median_s']:.1f}x"
           if tr.get('client_loop_median_s') and r.get('clients_vmap') else '-'),
          (f"{sync['median_s']:.3f} ({100 * sync['median_s'] / med:.1f}%)"
           if sync and med else '-'),
          f"{1e3 * r['augment']['median_s']:.1f}" if r.get('augment') else '-',
          f(full, 'gflop', '{:.0f}'), f(full, 'gflops_per_s', '{:.0f}'),
          f"{100 * full['peak_fraction']:.0f}%" if full else '-',
          f"{s['peak_rss_mib'] / 1024:.1f}", f(full, 'compile_s', '{:.0f}'),
          str(full.get('recompilations', '-')), f"{s['load_avg_end'][0]:.1f}"]) + ' |')
  return '\n'.join(lines)


def plot(reports, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  labels, ours, ref, parts = [], [], [], {k: [] for k in ('server', 'clients_vmap', 'sync')}
  for rep in reports:
    for s, r in rows(rep):
      st = s['setting']
      if 'full_step' not in r:
        continue
      labels.append(f"{rep['threads']}t {st['clients']}({st['pool']}) c{st['cut']}")
      ours.append(r['full_step']['images_per_s'])
      tr = s.get('torch_reference', {})
      ref.append(tr.get('images_per_s', 0.0))
      for k in parts:
        parts[k].append(r[k]['median_s'] if k in r else 0.0)
  x = range(len(labels))
  axes[0].bar([i - 0.2 for i in x], ours, 0.4, label='JAX step (this repo)')
  axes[0].bar([i + 0.2 for i in x], ref, 0.4, label='PyTorch reference-shaped step, same run')
  # The reference code's own figures on this machine type (README.md, "Speed and scale").
  axes[0].axhspan(10, 15, color='grey', alpha=0.2, label='reference code, 2 threads (issue 7)')
  axes[0].axhline(6.5, color='grey', ls='--', lw=1, label='reference code, 1 thread (issue 7)')
  axes[0].set_ylabel('images / s (100 images per step)')
  axes[0].set_xticks(list(x), labels, rotation=60, ha='right', fontsize=7)
  axes[0].set_ylim(0, 1.45 * max(ours + ref))      # headroom: the legend sits above the bars
  axes[0].legend(fontsize=8, loc='upper left', ncol=2)
  axes[0].set_title('Full step throughput')
  bottom = [0.0] * len(labels)
  for k, v in parts.items():
    axes[1].bar(list(x), v, 0.6, bottom=bottom, label=k)
    bottom = [a + b for a, b in zip(bottom, v)]
  axes[1].set_ylabel('seconds (medians, timed separately)')
  axes[1].set_xticks(list(x), labels, rotation=60, ha='right', fontsize=7)
  axes[1].legend(fontsize=8)
  axes[1].set_title('Where a step goes')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  files = sys.argv[1:] or sorted(glob.glob(str(ROOT / 'results' / 'step_*.json')))
  reports = [json.loads(pathlib.Path(f).read_text()) for f in files]
  reports = [r for r in reports if 'settings' in r and 'threads' in r]   # step_bench.py output only
  reports.sort(key=lambda r: -r['threads'])
  text = table(reports)
  print(text)
  plot(reports, ROOT / 'results' / 'summary.png')
  readme = ROOT / 'README.md'
  if readme.exists():
    body = readme.read_text()
    if START in body and END in body:
      pre, rest = body.split(START, 1)
      post = rest.split(END, 1)[1]
      readme.write_text(pre + START + '\n' + text + '\n' + END + post)


if __name__ == '__main__':
  main()
