from mlx_dft.cli import main

main()
