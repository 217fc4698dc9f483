"""The model-inversion attack on a run's checkpoint: how well smashed data gives the images away.

    python -m mocosfl_jax.attack --workdir runs/quickstart --checkpoint latest --fraction 0.348

The command-line front of privacy/attack.py (what the attack does is described there): a decoder
trained on a `--fraction` of the training images inverts client K's smashed data of the first
`--num-test` test images. It prints one progress line per decoder epoch and the figures, then
writes `<workdir>/attack_<step>_c<K>.json` and `.png` (originals above, reconstructions below)
and copies them to `attack.json` and `attack.png` (the latest attack), each whole or not at all;
when they cannot be written the results are printed and the status is 1.
"""
import json
import sys

from absl import flags

from mocosfl_jax import cli
from mocosfl_jax.privacy import attack as attack_lib
from mocosfl_jax.privacy import decoder as decoder_lib

_DEFAULTS = attack_lib.Settings()


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  define = lambda kind, name, default, doc: getattr(flags, f"DEFINE_{kind}")(
      name, default, doc, flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).",
                      flag_values=flag_values, required=True)
  define("string", "checkpoint", "best", "latest, best or a step number.")
  define("integer", "client", 0, "Which client's slice to attack (0-based).")
  define("float", "fraction", _DEFAULTS.fraction,
         "Share of the training images the attacker holds: the reference's 1% is 500 CIFAR-10 "
         "images; 0.348 gives the same 500 of digits' 1 437.")
  define("string", "decoder", _DEFAULTS.decoder,
         f"Decoder res_normN<blocks>C<channels> (the reference's: {decoder_lib.DEFAULT_NAME}).")
  define("integer", "epochs", _DEFAULTS.epochs, "Decoder training epochs.")
  define("integer", "batch-size", _DEFAULTS.batch_size, "Decoder training batch.")
  define("float", "lr", _DEFAULTS.lr, "Decoder Adam learning rate.")
  define("integer", "num-test", _DEFAULTS.num_test, "The first N test images are inverted.")
  define("bool", "jpeg", _DEFAULTS.jpeg,
         "Targets through a JPEG round trip (quality 75), as the reference's.")
  define("integer", "seed", _DEFAULTS.seed, "Seed of the attacker's images, init and order.")


def attack_command(args) -> int:
  """Attacks, prints the figures and writes attack_<step>_c<K>.json/.png and attack.json/.png."""
  settings = attack_lib.Settings(
      fraction=args.fraction, decoder=args.decoder, epochs=args.epochs,
      batch_size=args.batch_size, lr=args.lr, num_test=args.num_test, jpeg=args.jpeg,
      seed=args.seed)
  result, grid = attack_lib.attack(args.workdir, args.checkpoint, args.client, settings)
  print(f"attacked checkpoint step {result['step']} (--checkpoint {args.checkpoint}), client "
        f"{result['client']}: MSE {result['mse']:.4f} | SSIM {result['ssim']:.4f} | PSNR "
        f"{result['psnr']:.2f} dB on {result['num_test']} test images (decoder best at epoch "
        f"{result['best_epoch']}, {result['seconds']:.0f} s)")
  for name, b in result["baselines"].items():   # what guessing scores, without inverting
    print(f"  without inverting, the attacker's {name.replace('_', ' ')}: MSE {b['mse']:.4f} | "
          f"SSIM {b['ssim']:.4f} | PSNR {b['psnr']:.2f} dB")
  try:
    paths = attack_lib.write_outputs(args.workdir, result, grid)
  except OSError as e:
    print(json.dumps(result, indent=1))
    print(f"error: cannot write the attack's files in {args.workdir}: {e.strerror or e}; the "
          "results are printed above", file=sys.stderr)
    return 1
  print("written to " + ", ".join(str(p) for p in paths))
  return 0


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, attack_command, argv, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
  main()
